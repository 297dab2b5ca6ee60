"""Pretraining from token shards: wires data.py's windows and a fresh Transformer into loop.train.

Used by `annotated-llama pretrain` (one process, or every rank under torchrun).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..core.config import ModelArgs, estimate_flops_per_token
from ..core.model import Transformer
from ..core.tokenizer import Tokenizer
from ..data.pretokenize import WindowSampler, check_tokenizer, fixed_windows, open_tokens, read_shard_meta
from ..parallel import distributed as dist_utils
from .loop import TrainConfig, token_loss_eval, train


def model_args(preset: str, vocab_size: int, seq_len: int) -> ModelArgs:
    """A preset name or a params.json path; vocab_size -1 takes the tokenizer's."""
    if preset.endswith(".json") or Path(preset).is_file():
        args = ModelArgs.from_params_json(preset)
    else:
        args = ModelArgs.from_name(preset)
    if args.vocab_size == -1:
        args = dataclasses.replace(args, vocab_size=vocab_size)
    if args.vocab_size != vocab_size:
        raise ValueError(f"--preset {preset}: vocab_size {args.vocab_size} does not match the tokenizer's {vocab_size}")
    if seq_len > args.max_seq_len:
        args = dataclasses.replace(args, max_seq_len=seq_len)
    return args


def check_memory(args: ModelArgs, device: str, preset: str) -> None:
    """Refuse, from the config alone, a model whose training state cannot fit: float32 weights,
    gradients and AdamW's two moments are 16 bytes per parameter (activations come on top)."""
    need = 16 * args.num_params()
    if device.startswith("cuda"):
        have = torch.cuda.get_device_properties(torch.device(device).index or 0).total_memory
    else:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ValueError(f"--preset {preset}: {args.size_summary()}; training it needs {need / 1e9:,.1f} GB for "
                         f"weights, gradients and AdamW state alone, but {device} has {have / 1e9:,.1f} GB")


def init_weights(model: Transformer, seed: int):
    """GPT-2-style initialisation (Radford et al. 2019): N(0, 0.02) everywhere, the residual
    output projections (wo, w2) scaled by 1/sqrt(2 * n_layers); norm gains 1. Meta did not
    publish LLaMA's initialisation; this is the common choice for the architecture."""
    g = torch.Generator().manual_seed(seed)
    scaled = 0.02 / math.sqrt(2 * model.params.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            continue
        std = scaled if name.endswith(("wo.weight", "w2.weight")) else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def pretrain(data_dir, tokenizer_path, preset: str, cfg: TrainConfig, *, batch_size: int, seq_len: int,
             parallel: str = "none", eval_windows: int = 32) -> dict:
    meta = read_shard_meta(data_dir)
    tokenizer_path = Path(tokenizer_path) if tokenizer_path else Path(data_dir) / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: tokenizer not found (pass --tokenizer)")
    vocab = Tokenizer(tokenizer_path).n_words
    check_tokenizer(data_dir, tokenizer_path, vocab)
    args = model_args(preset, meta["vocab_size"], seq_len)

    check_memory(args, cfg.device, preset)
    rank, world, device = dist_utils.init_from_env(cfg.device)
    # what defines this run, as its flags: compared with the checkpoint's on --resume
    run = {"--data": {k: meta.get(k) for k in ("tokenizer_sha256", "train_tokens", "val_tokens")},
           "--preset": args.to_params_json(), "--batch-size": batch_size, "--seq-len": seq_len,
           **{"--" + k.replace("_", "-"): getattr(cfg, k) for k in ("max_steps", "lr", "min_lr_ratio", "warmup_steps",
                                                                     "weight_decay", "grad_clip", "grad_accum",
                                                                     "dtype", "seed")},
           "processes (--nproc-per-node)": world}
    cfg = dataclasses.replace(cfg, device=device, run=run)
    if cfg.flops_per_token is None:
        cfg.flops_per_token = estimate_flops_per_token(args, seq_len)
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    init_weights(model, cfg.seed)
    model.to(device)
    model = dist_utils.wrap(model, parallel, device)

    train_tokens = open_tokens(data_dir, "train")
    batches = WindowSampler(train_tokens, batch_size, seq_len, cfg.seed, rank, world)
    val_tokens = open_tokens(data_dir, "val")
    val_batches = list(fixed_windows(val_tokens, seq_len, eval_windows))

    def write_files(d: Path):
        (d / "params.json").write_text(json.dumps(args.to_params_json(), indent=2) + "\n")
        shutil.copyfile(tokenizer_path, d / "tokenizer.model")

    if rank == 0:
        print(f"model: {args.num_params() / 1e6:.2f}M parameters, {args.n_layers} layers, dim {args.dim}; "
              f"{len(train_tokens):,} training tokens; {world} process(es), parallel={parallel}", flush=True)
    try:
        return train(model, batches, cfg, evaluate=token_loss_eval(val_batches), write_files=write_files)
    finally:
        dist_utils.teardown()
