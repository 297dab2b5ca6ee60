"""Peak resident memory of `load_model` on a bf16 checkpoint of a few hundred MB, per format.

    python bench/load_memory.py [--dim 1024 --layers 12] [--keep DIR]

Each load runs in a fresh subprocess, which reports (from /proc/self/status):
  - load: the peak RSS while `load_model` runs, above the RSS just before it (the peak is
    reset with /proc/self/clear_refs first, so imports do not count);
  - touched: the same peak after a forward pass, which reads every weight once (a mapped
    file's pages count as resident once read; they are clean page cache the kernel can drop).
Ratios are those peaks over the checkpoint's size S; the goal is <= 1.2 x S.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(path: str) -> None:
    import torch

    from annotated_llama.weights import load_model
    import gguf  # noqa: F401  (imported up front so the import is not counted as loading)

    torch.set_num_threads(2)
    base = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    model, _ = load_model(path)
    load_peak = status_mib("VmHWM") - base
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long), cache=False)
    touched_peak = status_mib("VmHWM") - base
    print(json.dumps({"load": load_peak, "touched": touched_peak,
                      "dtype": str(model.tok_embeddings.weight.dtype)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--keep", help="write the checkpoints here instead of a temporary dir")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)

    import torch

    from annotated_llama import ModelArgs, Tokenizer, Transformer

    spm = Path(__file__).resolve().parents[1] / "tests" / "assets" / "llama-spm.model"
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64, vocab_size=32000, max_seq_len=512)
    model = Transformer(margs).to(torch.bfloat16)
    tok = Tokenizer(spm)
    out = Path(args.keep or tempfile.mkdtemp(prefix="load-memory-"))
    try:
        measure(model, tok, margs, out)
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)  # ~4 x S of checkpoints


def measure(model, tok, margs, out: Path) -> None:
    from annotated_llama.weights import save_model

    cases = {"ours (safetensors)": (out / "ours", "ours"), "HF (safetensors)": (out / "hf", "hf"),
             "Meta (.pth)": (out / "meta", "meta"), "GGUF (BF16)": (out / "model.gguf", "gguf")}
    for target, fmt in cases.values():
        save_model(model, tok, target, format=fmt, dtype="bf16")
    size = margs.num_params() * 2  # bytes of bf16 weights
    print(f"checkpoint: {margs.num_params() / 1e6:.0f}M parameters, bf16, S = {size / 2**20:.0f} MiB")
    print(f"{'format':<20} {'peak during load':>18} {'ratio':>6}   {'after a forward':>16} {'ratio':>6}")
    for name, (target, _) in cases.items():
        r = subprocess.run([sys.executable, __file__, "--child", str(target)], capture_output=True, text=True)
        if r.returncode:
            print(f"{name:<20} failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        mib = size / 2**20
        print(f"{name:<20} {m['load']:>14.0f} MiB {m['load'] / mib:>6.2f}   {m['touched']:>12.0f} MiB "
              f"{m['touched'] / mib:>6.2f}")


if __name__ == "__main__":
    main()
