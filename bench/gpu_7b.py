"""Decode tokens/s of a 7B-shaped random model on one GPU: bfloat16, int8, int4 (a few minutes).

    python bench/gpu_7b.py                        # llama-7b shape on cuda: eager bf16, then compiled bf16/int8/int4
    python bench/gpu_7b.py --time-limit 170 --out r.json   # stop starting runs that cannot finish in time
    python bench/gpu_7b.py --preset tiny --device cpu --no-compile   # the same code, seconds on a CPU

The model is built on the meta device and its weights allocated and filled on the GPU (seconds,
no 27 GB of CPU init). Each run (`--modes`, in order; `MODE:eager` forces the eager backend) goes
through the public API: `Llama(model, tokenizer, backend="compiled" | "eager")` on the bfloat16
weights (int8/int4: on a quantized copy, annotated_llama.transforms.quantize), then `Llama.generate(prompt,
max_gen_len=n, temperature=0, ignore_eos=True)` at batch 1. The "compiled" backend compiles its
decode step in the first call (the warm-up, with the timed call's prompt and token count), so the
timed calls run compiled. Decode tokens/s are (n - 1) / (t(n) - t(1)), medians of `--reps` calls
making n and 1 new tokens (prefill and the first token excluded); end-to-end tokens/s too.
Also reported: the weight bytes read per token (embedding table excluded: one row per token),
the bandwidth that implies, and the device's measured copy bandwidth, its practical ceiling
(an H100 SXM is rated 3.35 TB/s, an H200 4.8 TB/s, so bf16 7B's ceiling is ~250 or ~360 tok/s).

With --time-limit, a run that would not finish before the limit is done eagerly instead (when
that fits) or skipped, and the JSON is rewritten after every run, so a kill keeps what was done.
A run that fails records its error and the rest go on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

T_START = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from annotated_llama import Llama, ModelArgs, Tokenizer, Transformer  # noqa: E402
from annotated_llama.transforms.quantize import quantize_model  # noqa: E402

# the engine needs a tokenizer for its stop ids and vocabulary clip; ignore_eos makes stops moot
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "assets" / "llama-spm.model"

# bytes per weight in HBM (scales excluded: int8 +2 bytes per row, int4 +4 bytes per 128-group)
BYTES_PER_WEIGHT = {"bfloat16": 2.0, "float32": 4.0, "float16": 2.0, "int8": 1.0, "int4": 0.5}
# first guesses of a run's seconds (build + warm-up + timing), replaced by what earlier runs took
GUESS_S = {"eager": 25.0, "compile": 100.0, "int4_build": 25.0}


def elapsed() -> float:
    return time.perf_counter() - T_START


def build(args: ModelArgs, device: str, seed: int) -> Transformer:
    # construct shapes only, then allocate on the device and fill there
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


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth_gb_s(device: str, nbytes: int) -> float:
    """Device-to-device copy, bytes read + written per second: the practical bandwidth ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2] / 1e9


def run_one(model: Transformer, mode: str, compile: bool, a) -> dict:
    import copy
    out = {"mode": mode, "compile": compile}
    if mode not in BYTES_PER_WEIGHT:
        raise ValueError(f"--modes: unknown mode {mode!r}; known: {', '.join(BYTES_PER_WEIGHT)}")
    t0 = time.perf_counter()
    if mode in ("int8", "int4"):
        weights = quantize_model(copy.deepcopy(model), mode)
    else:
        weights = model if mode == "bfloat16" else copy.deepcopy(model).to(getattr(torch, mode))
    llm = Llama(weights, Tokenizer(TOKENIZER), max_batch_size=1, backend="compiled" if compile else "eager")
    sync(a.device)
    out["build_s"] = time.perf_counter() - t0
    prompt = list(range(1, a.prompt_len + 1))

    def call(n):
        sync(a.device)
        t = time.perf_counter()
        tokens = llm.generate([prompt], max_gen_len=n, temperature=0, ignore_eos=True)[0][0]
        sync(a.device)
        return tokens, time.perf_counter() - t
    t0 = time.perf_counter()
    first, _ = call(a.new_tokens)  # warm-up: the timed call's shapes (compile, graph capture)
    out["warmup_s"] = time.perf_counter() - t0
    walls, ones, tokens = [], [], None
    for _ in range(a.reps):
        ones.append(call(1)[1])
        tokens, wall = call(a.new_tokens)
        walls.append(wall)
    wall, one = sorted(walls)[len(walls) // 2], sorted(ones)[len(ones) // 2]
    out["end_to_end_tok_s"] = a.new_tokens / wall
    if wall > one:
        out["decode_tok_s"], out["decode_tok_s_from"] = (a.new_tokens - 1) / (wall - one), "t(n) - t(1)"
    else:  # too few tokens to tell the decode from the prefill
        out["decode_tok_s"], out["decode_tok_s_from"] = out["end_to_end_tok_s"], "end-to-end wall time"
    out["same_tokens_each_call"] = tokens == first and len(tokens) == a.new_tokens
    out["first_tokens"] = tokens[:12]
    runner = llm.engine.runner
    out["runner"] = type(runner).__name__ if not hasattr(runner, "__self__") else "model.step (eager)"
    if isinstance(getattr(runner, "calls", None), dict):
        out["runner_calls"] = dict(runner.calls)
    if getattr(runner, "error", None):
        out["compile_error"] = runner.error
    n_weights = model.params.num_params() - model.params.vocab_size * model.params.dim
    out["weight_gb_per_token"] = n_weights * BYTES_PER_WEIGHT[mode] / 1e9
    out["implied_gb_s"] = out["weight_gb_per_token"] * out["decode_tok_s"]
    if a.device.startswith("cuda"):
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del llm, weights
    return out


def plan(mode: str, compile: bool, a, took: dict) -> tuple[bool, str | None]:
    """(compile, None) to run, possibly eagerly instead; (False, reason) to skip."""
    if not a.time_limit:
        return compile, None
    left = a.time_limit - elapsed()
    extra = GUESS_S["int4_build"] if mode == "int4" else 0.0
    need_compiled = took.get("compile", GUESS_S["compile"]) + extra
    need_eager = took.get("eager", GUESS_S["eager"]) + extra
    if compile and left >= need_compiled:
        return True, None
    if left >= need_eager:
        return False, None
    return False, f"skipped: {left:.0f} s left of --time-limit, a run needs ~{need_eager:.0f} s"


def write(info: dict, path):
    if path:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", default="bfloat16:eager,bfloat16,int8,int4",
                   help="runs in order; MODE:eager runs without torch.compile (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-seq-len", type=int, default=512, help="a short context keeps the KV cache small")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="every run eager")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds from start: later runs go eager or are skipped to finish by then (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the JSON summary here (after every run)")
    a = p.parse_args(argv)
    runs = []
    for item in a.modes.split(","):
        mode, _, how = item.strip().partition(":")
        if how not in ("", "eager", "compile"):
            p.error(f"--modes: {item!r}: the suffix must be :eager or :compile")
        run = (mode, a.compile and how != "eager")
        if run not in runs:  # with --no-compile, "bfloat16:eager" and "bfloat16" are one run
            runs.append(run)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (use --device cpu with a tiny --preset)")
    args = ModelArgs.from_name(a.preset, max_seq_len=a.max_seq_len, max_batch_size=1)
    info = {"preset": a.preset, "params": args.num_params(), "device": a.device, "torch": torch.__version__,
            "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "reps": a.reps, "results": []}
    if a.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    t0 = time.perf_counter()
    model = build(args, a.device, a.seed)
    sync(a.device)
    info["build_model_s"] = time.perf_counter() - t0
    info["copy_gb_s"] = copy_bandwidth_gb_s(a.device, (2 << 30) if a.device.startswith("cuda") else (64 << 20))
    print(f"{a.preset}: {args.num_params() / 1e9:.2f}B params on {info.get('gpu', a.device)}, built in "
          f"{info['build_model_s']:.1f} s; copy bandwidth {info['copy_gb_s']:.0f} GB/s", flush=True)
    write(info, a.out)
    took, done = {}, set()
    for mode, want_compile in runs:
        compile, skip = plan(mode, want_compile, a, took)
        if not skip and (mode, compile) in done:
            skip = "skipped: too little of --time-limit left to compile, and the eager run is done"
        done.add((mode, compile))
        if skip:
            r = {"mode": mode, "compile": want_compile, "skipped": skip}
            print(f"{mode:>9}: {skip}", flush=True)
        else:
            t_run = time.perf_counter()
            try:
                r = run_one(model, mode, compile, a)
                if want_compile and not compile:
                    r["note"] = "run eagerly: too little of --time-limit left to compile"
                r["ceiling_fraction"] = r["implied_gb_s"] / info["copy_gb_s"]
                print(f"{mode:>9} {'compiled' if compile else 'eager':>8}: {r['decode_tok_s']:8.1f} tok/s "
                      f"({r['implied_gb_s']:.0f} GB/s of weights, {r['ceiling_fraction']:.0%} of the copy "
                      f"bandwidth; build {r['build_s']:.0f} s, warm-up {r['warmup_s']:.0f} s)", flush=True)
            except Exception as e:  # report and go on with the next run
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                r = {"mode": mode, "compile": compile, "error": f"{type(e).__name__}: {msg}"[:400],
                     "traceback": traceback.format_exc()[-2000:]}
                print(f"{mode:>9}: FAILED {r['error']}", flush=True)
            spent = time.perf_counter() - t_run
            key = "compile" if compile else "eager"
            took[key] = max(took.get(key, 0.0), spent - (GUESS_S["int4_build"] if mode == "int4" else 0.0))
            r["run_s"] = spent
        info["results"].append(r)
        info["elapsed_s"] = elapsed()
        write(info, a.out)
        gc.collect()
        if compile:
            torch._dynamo.reset()  # drop compiled code (and what it holds) before the next run
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(json.dumps({k: v for k, v in info.items() if k != "results"}))
    for r in info["results"]:
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
