"""Peak resident memory of `load_model` on GGUF files written by llama.cpp's own quantizer, per type.

    python bench/gguf_memory.py [--preset bench-134m] [--types Q4_K_M,Q8_0] [--keep DIR]

A random-weight model of the preset is saved as an F16 GGUF by our `save_model`, quantized by
llama.cpp (llama-cpp-python's `llama_model_quantize`, the `bench` extra) to each type, and each file
is loaded by `load_model(path)` (dtype None: the int8/int4 kernels) in a fresh subprocess, which
reports (from /proc/self/status, as bench/load_memory.py does):
  - peak: the peak RSS while `load_model` runs, above the RSS just before it;
  - model: the bytes of the loaded model's tensors (each shared tensor once).
Ratios are over the file's size S; the goals are peak <= 1.5 x S + a small constant, and a model
of about S.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0", "Q3_K_M", "Q2_K",
         "IQ4_NL", "IQ4_XS", "IQ3_S"]


def child(path: str) -> None:
    import torch

    from annotated_llama.weights import load_model
    from bench.load_memory import status_mib
    import gguf  # noqa: F401  (imported up front so the import is not counted as loading)

    torch.set_num_threads(2)
    base = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current RSS
    start = time.perf_counter()
    model, _ = load_model(path)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM") - base
    seen, size = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            size += t.numel() * t.element_size()
    rope = model.rope_freqs.numel() * 4  # the rotary frequencies are not weights
    kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ or "Emb" in
                    type(m).__name__})
    print(json.dumps({"peak": peak, "model": (size - rope) / 2**20, "seconds": seconds, "kinds": kinds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="bench-134m")
    p.add_argument("--types", default=",".join(TYPES), help="llama.cpp file types (LLAMA_FTYPE_MOSTLY_*)")
    p.add_argument("--keep", help="write the files here instead of a temporary dir")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)

    import llama_cpp
    import torch

    from annotated_llama import ModelArgs, Tokenizer, Transformer
    from annotated_llama.weights import save_model

    root = Path(__file__).resolve().parents[1]
    torch.manual_seed(0)
    margs = ModelArgs.from_name(args.preset)
    model = Transformer(margs).to(torch.bfloat16)
    out = Path(args.keep or tempfile.mkdtemp(prefix="gguf-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    src = out / f"{args.preset}-F16.gguf"
    save_model(model, Tokenizer(root / "tests" / "assets" / "llama-spm.model"), src, format="gguf", dtype="f16")
    del model
    print(f"{args.preset}: {margs.num_params() / 1e6:.0f}M parameters, random weights; files by llama.cpp "
          f"(llama-cpp-python {llama_cpp.__version__}); load_model(path) in a fresh process each")
    print(f"{'type':<8} {'file S':>9} {'peak during load':>17} {'/ S':>5} {'model':>9} {'/ S':>5} {'load s':>7}  kernels")
    try:
        for name in ["F16", *args.types.split(",")]:
            path = src if name == "F16" else out / f"{args.preset}-{name}.gguf"
            if name != "F16":
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype, params.nthread = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name), 2
                if llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(), ctypes.byref(params)):
                    print(f"{name:<8} llama.cpp's quantizer failed")
                    continue
            r = subprocess.run([sys.executable, "-m", "bench.gguf_memory", "--child", str(path)], cwd=root,
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{name:<8} failed: {r.stderr.strip().splitlines()[-1]}")
                continue
            m = json.loads(r.stdout.strip().splitlines()[-1])
            size = path.stat().st_size / 2**20
            print(f"{name:<8} {size:>5.0f} MiB {m['peak']:>13.0f} MiB {m['peak'] / size:>5.2f} {m['model']:>5.0f} MiB "
                  f"{m['model'] / size:>5.2f} {m['seconds']:>7.1f}  {', '.join(m['kinds'])}")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
