"""Export a training checkpoint as a model dir: params.json, model.safetensors (Meta key names,
16-bit to halve the size), tokenizer.model, and eval.json with the validation perplexity measured
on the exported (rounded) weights, so the figure shipped is the one a user reproduces.

    annotated-llama export RUN_DIR|CKPT_DIR OUT_DIR --data SHARD_DIR   (cli/export.py)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.config import ModelArgs
from ..core.outputs import check_output
from ..weights import load_model
from .checkpoint import latest_checkpoint, load_train_checkpoint
from .evaluation import EVAL_SEQ_LEN, EVAL_WINDOWS, evaluate_model

FILES = ("params.json", "model.safetensors", "tokenizer.model", "eval.json")


def export(src, out_dir, data_dir, dtype: torch.dtype = torch.bfloat16, log_path=None, force: bool = False) -> dict:
    """Write FILES into `out_dir` (a dir that may hold other files, as the package's default_model
    does); FILES already there are replaced only with `force`, and never from inside `src`."""

    src = Path(src)
    ckpt = src if (src / "train_state.pt").is_file() else latest_checkpoint(src)
    if ckpt is None:
        raise FileNotFoundError(f"{src}: no checkpoint (ckpt-NNNNNNN with train_state.pt) found")
    out = Path(out_dir)
    check_output(out, force=True, inputs=[ckpt, data_dir], flag="OUT")  # never the run's or the data's dir
    for name in FILES:
        check_output(out / name, force=force, flag="OUT")
    tmp = out.with_name(f".{out.name}.export-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    args = ModelArgs.from_params_json(ckpt / "params.json")
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp / "model.safetensors")
    shutil.copyfile(ckpt / "params.json", tmp / "params.json")
    shutil.copyfile(ckpt / "tokenizer.model", tmp / "tokenizer.model")

    _, train_state = load_train_checkpoint(ckpt)  # a damaged checkpoint: one line naming its file
    model, _ = load_model(tmp, dtype=torch.float32)
    metrics = evaluate_model(model, data_dir, seq_len=EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS)
    info = {
        **metrics,
        "how": (f"mean next-token cross-entropy over the first {metrics['windows']} non-overlapping windows "
                f"of {EVAL_SEQ_LEN} tokens of the validation split (val.bin: every 40th document held out), "
                f"weights as stored ({str(dtype).removeprefix('torch.')}), forward in float32; "
                "val_ppl = exp(val_loss). Reproduce: annotated-llama evaluate --model DIR --data SHARD_DIR"),
        "params": args.num_params(),
        "train_steps": train_state["step"], "train_tokens": train_state["tokens"],
        "train_seconds": round(train_state["elapsed_s"], 1),
        "train_config": {k: train_state["config"][k] for k in
                         ("lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "eps",
                          "grad_clip", "grad_accum", "dtype", "seed", "max_steps")},
    }
    if log_path and Path(log_path).is_file():
        rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
        speed = [r for r in rows if "tokens_per_s" in r]
        if speed:
            info["tokens_per_s_median"] = sorted(r["tokens_per_s"] for r in speed)[len(speed) // 2]
            mfu = sorted(r.get("mfu", 0.0) for r in speed)
            info["mfu_median"] = mfu[len(mfu) // 2]
    (tmp / "eval.json").write_text(json.dumps(info, indent=2) + "\n")

    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # replace file by file: the package dir holds other files (__init__.py)
        os.chmod(tmp / name, 0o644)
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)
    return info
