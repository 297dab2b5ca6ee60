"""Decode tokens/s of a 7B-shaped random model on one GPU: bfloat16, int8, int4 (a few minutes).

    python bench/gpu_7b.py                        # llama-7b shape on cuda, compiled decode step
    python bench/gpu_7b.py --preset tiny --device cpu --no-compile   # the same code, seconds on a CPU

For each precision: build the FastDecoder (int8/int4 quantize the bfloat16 weights first),
warm up (this triggers torch.compile and CUDA-graph capture), then time `--new-tokens` greedy
tokens at batch 1 after a short prompt. Prints one line per precision and a JSON summary,
with the weight bytes read per token and the implied bandwidth (an H100 SXM reads ~3.35 TB/s,
so bf16 7B's ceiling is ~250 tok/s). A precision that fails prints its error and the rest go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from annotated_llama import ModelArgs, Transformer  # noqa: E402
from annotated_llama.fast import FastDecoder  # noqa: E402

BYTES_PER_WEIGHT = {"bfloat16": 2.0, "float32": 4.0, "float16": 2.0, "mixed": 2.0, "int8": 1.0, "int4": 0.5}


def build(args: ModelArgs, device: str, seed: int) -> Transformer:
    # construct shapes only, then allocate on the device and fill there: no 27 GB of CPU init
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.reset_rope()
    return model.to(torch.bfloat16).eval()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(model, mode, a) -> dict:
    t0 = time.perf_counter()
    fd = FastDecoder(model, mode, compile=a.compile)
    build_s = time.perf_counter() - t0
    prompt = list(range(1, a.prompt_len + 1))
    t0 = time.perf_counter()
    fd.generate([prompt], 8)  # warm-up: compiles / captures on first use
    fd.generate([prompt], 8)
    sync(a.device)
    warm_s = time.perf_counter() - t0
    rates = []
    for _ in range(a.reps):
        sync(a.device)
        fd.generate([prompt], a.new_tokens)
        sync(a.device)
        rates.append(fd.stats["decode_tokens"] / fd.stats["decode_s"])
    rates.sort()
    n_weights = model.params.num_params() - model.params.vocab_size * model.params.dim
    tok_s = rates[len(rates) // 2]
    out = {"mode": mode, "decode_tok_s": tok_s, "build_s": build_s, "warmup_s": warm_s,
           "weight_gb_per_token": n_weights * BYTES_PER_WEIGHT[mode] / 1e9}
    out["implied_gb_s"] = out["weight_gb_per_token"] * tok_s
    if a.device.startswith("cuda"):
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del fd
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="bfloat16,int8,int4")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=512, help="a short context keeps the KV cache small")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON summary here")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (use --device cpu with a tiny --preset)")
    args = ModelArgs.from_name(a.preset, max_seq_len=a.max_seq_len, max_batch_size=1)
    t0 = time.perf_counter()
    model = build(args, a.device, a.seed)
    info = {"preset": a.preset, "params": args.num_params(), "device": a.device, "compile": a.compile,
            "torch": torch.__version__, "build_model_s": time.perf_counter() - t0, "results": []}
    if a.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    print(f"{a.preset}: {args.num_params() / 1e9:.2f}B params on {info.get('gpu', a.device)}, "
          f"compile={a.compile}", flush=True)
    for mode in a.modes.split(","):
        try:
            r = run_one(model, mode, a)
            print(f"{mode:>9}: {r['decode_tok_s']:7.1f} tok/s  ({r['implied_gb_s']:.0f} GB/s of weights, "
                  f"warm-up {r['warmup_s']:.0f} s)", flush=True)
        except Exception as e:  # report and go on with the next precision
            r = {"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
            print(f"{mode:>9}: FAILED {r['error']}", flush=True)
        info["results"].append(r)
        gc.collect()
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(json.dumps(info, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
