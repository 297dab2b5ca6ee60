"""A time-boxed hyper-parameter sweep for the Alpaca gain (docs/paper/09_instruction.md, section 6).

    PYTHONUNBUFFERED=1 python scripts/alpaca_sweep.py --device cuda --budget-s 170 --out DIR

Each configuration fine-tunes the embedded default model through `finetune()` (the code behind
`annotated-llama finetune`, so the same loop and data path), reloads what it wrote (the adapter onto
the base, or the full checkpoint) and scores held-out exact match with `instruct_tasks.evaluate`.
The sweep has a wall-clock budget: a short calibration run measures optimizer steps per second, and
each configuration gets its share of the time left, as steps (the cosine schedule must know its
length in advance). One JSON line per result goes to stdout and DIR/sweep.jsonl; DIR/best_args.txt
holds the winner's `annotated-llama finetune` arguments (steps scaled to --final-s seconds when given).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # noqa: E402

from annotated_llama.data.alpaca import load_records  # noqa: E402
from annotated_llama.default_model import default_model_dir  # noqa: E402
from annotated_llama.train.finetune import FinetuneConfig, finetune  # noqa: E402
from annotated_llama.data.instruct_tasks import evaluate  # noqa: E402
from annotated_llama.weights import load_model  # noqa: E402

# name: FinetuneConfig fields (and "data": "old" for the original 1,325-record split). Levers, one at
# a time from A: learning rate (B), rank (C), batch (D), a full fine-tune (E), the data (F).
CONFIGS = {
    "A_r16_lr1e-3": dict(lora=True, lora_r=16, lora_alpha=32, lr=1e-3, batch_size=64),
    "B_r16_lr3e-3": dict(lora=True, lora_r=16, lora_alpha=32, lr=3e-3, batch_size=64),
    "C_r64_lr3e-3": dict(lora=True, lora_r=64, lora_alpha=128, lr=3e-3, batch_size=64),
    "D_r64_lr3e-3_b128": dict(lora=True, lora_r=64, lora_alpha=128, lr=3e-3, batch_size=128),
    "E_full_lr5e-4": dict(lora=False, lr=5e-4, batch_size=64),
    "F_old_data_r16_lr3e-3": dict(lora=True, lora_r=16, lora_alpha=32, lr=3e-3, batch_size=64, data="old"),
}
LORA_DEFAULTS = dict(lora_targets="all", lora_dropout=0.0)


def cli_args(cfg: dict, steps: int) -> list[str]:
    args = ["--lora", "--lora-targets", cfg["lora_targets"], "--lora-r", str(cfg["lora_r"]),
            "--lora-alpha", str(cfg["lora_alpha"]), "--lora-dropout", str(cfg["lora_dropout"])] if cfg["lora"] else []
    return args + ["--lr", str(cfg["lr"]), "--batch-size", str(cfg["batch_size"]), "--max-steps", str(steps)]


def run_one(name, cfg, steps, args, heldout, work):
    data = args.old_data if cfg.get("data") == "old" else args.data
    out = work / name
    fields = {k: v for k, v in cfg.items() if k != "data"}
    fc = FinetuneConfig(model=args.model, data=str(data), out=str(out), max_steps=steps, device=args.device,
                        progress=False, log_every=max(1, steps // 4), seed=0, **fields)
    result = finetune(fc)
    t0 = time.perf_counter()
    model, tok = (load_model(args.model, lora=out, device=args.device) if cfg["lora"]
                  else load_model(out, device=args.device))
    report = evaluate(model.float(), tok, heldout, args.max_new_tokens, args.eval_batch)
    report.pop("rows")
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are not kept (the winner is rerun by the CLI)
    return {"name": name, "steps": steps, **{k: v for k, v in cfg.items()}, "accuracy": report["accuracy"],
            "per_task": {t: r["accuracy"] for t, r in report["per_task"].items()},
            "stopped_at_eos": report["stopped_at_eos"], "loss": result["loss"], "epochs": result["epochs"],
            "finetune_s": round(result["finetune_s"], 1), "eval_s": round(time.perf_counter() - t0, 1),
            "trainable_params": result["trainable_params"], "total_params": result["total_params"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="base model (default: the embedded default model)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "instruct" / "train.jsonl")
    p.add_argument("--old-data", help="the original 1,325-record training split, for config F: a file, or "
                   "'regenerate' (make_records with 200 per task, seed 0); F is skipped without it")
    p.add_argument("--heldout", type=Path, default=ROOT / "data" / "instruct" / "heldout.jsonl")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget-s", type=float, default=170.0, help="wall-clock seconds for the whole sweep")
    p.add_argument("--final-s", type=float, default=0.0, help="seconds the winner's rerun may train")
    p.add_argument("--max-steps", type=int, default=6000, help="cap on any configuration's steps")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names (default: all)")
    p.add_argument("--limit", type=int, help="score only the first N held-out records (smoke tests)")
    p.add_argument("--calibrate-steps", default="10,40", help="warm-up run, then the timed run")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    args.model = args.model or str(default_model_dir())
    args.out.mkdir(parents=True, exist_ok=True)
    heldout = load_records(args.heldout)[: args.limit]
    names = [n for n in args.configs.split(",") if n]
    work = Path(tempfile.mkdtemp(prefix="alpaca-sweep-"))
    if args.old_data == "regenerate":
        import lzma

        from annotated_llama.data.instruct_tasks import make_records
        text = lzma.open(ROOT / "data" / "world-english-bible.txt.xz", "rt", encoding="utf-8").read()
        args.old_data = work / "old_train.jsonl"
        args.old_data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in
                                         make_records(text, 200, 30, seed=0)[0]), encoding="utf-8")
    if args.old_data is None or not Path(args.old_data).is_file():
        names = [n for n in names if CONFIGS[n].get("data") != "old"]
    configs = {n: {**(LORA_DEFAULTS if CONFIGS[n]["lora"] else {}), **CONFIGS[n]} for n in names}
    log = open(args.out / "sweep.jsonl", "w")

    def emit(row):
        print(json.dumps(row), flush=True)
        log.write(json.dumps(row) + "\n")
        log.flush()

    # The base model, before any fine-tuning.
    model, tok = load_model(args.model, device=args.device)
    base = evaluate(model.float(), tok, heldout, args.max_new_tokens, args.eval_batch)
    base.pop("rows")
    emit({"name": "base", "accuracy": base["accuracy"], "per_task": {t: r["accuracy"] for t, r in
                                                                        base["per_task"].items()},
          "stopped_at_eos": base["stopped_at_eos"]})
    del model

    # Calibration: steps per second of the largest batch, after a warm-up run.
    big = max(configs.values(), key=lambda c: c["batch_size"])
    rates = []
    for steps in map(int, args.calibrate_steps.split(",")):
        t0 = time.perf_counter()
        r = run_one("calibrate", big, steps, args, heldout[:8], work)
        rates.append(steps / r["finetune_s"] if r["finetune_s"] else float("inf"))
        overhead = time.perf_counter() - t0 - r["finetune_s"]
    rate = rates[-1]
    emit({"name": "calibrate", "steps_per_s": round(rate, 2), "batch_size": big["batch_size"],
          "overhead_s": round(overhead, 1)})

    results = []
    for i, name in enumerate(names):
        left = args.budget_s - (time.perf_counter() - t_start)
        share = left / (len(names) - i) - overhead - 2.0
        steps = min(args.max_steps, max(10, int(rate * share)))
        row = run_one(name, configs[name], steps, args, heldout, work)
        emit(row)
        results.append(row)
        best = write_best(results, configs, args)  # after every result: a sweep cut short still has one

    emit({"name": "best", **best, "sweep_s": round(time.perf_counter() - t_start, 1)})
    shutil.rmtree(work, ignore_errors=True)


def write_best(results, configs, args) -> dict:
    """The best LoRA configuration on the new data so far (LoRA is the headline method; the full
    fine-tune and the old-data run are comparison rows), and its CLI arguments in best_args.txt with
    the steps that fill --final-s at the speed it ran."""
    lora = [r for r in results if configs[r["name"]]["lora"] and configs[r["name"]].get("data") != "old"]
    if not lora:
        return {}
    best = max(lora, key=lambda r: r["accuracy"])
    rate = best["steps"] / max(best["finetune_s"], 1e-6)
    final_steps = best["steps"] if args.final_s <= 0 else max(best["steps"], min(args.max_steps,
                                                                                  int(rate * args.final_s)))
    args_line = " ".join(cli_args(configs[best["name"]], final_steps))
    tmp = args.out / "best_args.txt.tmp"
    tmp.write_text(args_line + "\n")
    tmp.replace(args.out / "best_args.txt")
    return {"from": best["name"], "accuracy": best["accuracy"], "final_steps": final_steps, "finetune_args": args_line}


if __name__ == "__main__":
    main()
