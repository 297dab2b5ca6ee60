"""Batch-1 decode of our compiled step and llama.cpp, alternated inside one process.

    python bench/bench_engines.py --setup-only       # the exports this reads (same seeded model)
    python bench/paired_decode.py --rounds 5          # after it

Why a second harness: on a shared virtual machine the memory bandwidth drifts by +-20% over
minutes, and bench_engines.py runs each engine in its own process tens of seconds apart, so its
ratios carry that drift. Here each round times our engine and llama.cpp back to back on the same
prompt, a few hundred milliseconds apart, and the ratio is taken per round (then the median).
Both engines are warm (compiled, caches allocated) before the first round; both use the same
number of threads. Greedy agreement with the float32 reference is bench_engines.py's job.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))
PAIRS = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # our mode -> llama.cpp GGUF type


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/annotated-llama-bench")
    p.add_argument("--modes", default=",".join(PAIRS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON here")
    a = p.parse_args(argv)
    wd = Path(a.workdir)
    if not (wd / "spec.json").is_file():
        raise SystemExit(f"{wd}: no benchmark exports (run python bench/bench_engines.py --setup-only first)")
    modes = a.modes.split(",")
    if any(m not in PAIRS for m in modes):
        raise SystemExit(f"--modes: choose from {', '.join(PAIRS)}")

    import torch

    from bench_engines import LlamaCppEngine, OursEngine  # the engines bench_engines.py times

    torch.set_num_threads(a.threads)
    prompt = json.loads((wd / "spec.json").read_text())["short_prompt"]
    n = a.new_tokens
    engines = {}
    for mode in modes:
        t = time.perf_counter()
        ours = OursEngine(wd, mode, plain=False, compile=True)
        for _ in range(2):  # compile, then the first slow runs after it
            ours.generate([prompt], n)
        print(f"ours {mode}: built and compiled in {time.perf_counter() - t:.0f} s", flush=True)
        engines[mode] = (ours, LlamaCppEngine(wd, PAIRS[mode], a.threads))

    def tok_s(engine):
        _, _, rest = engine.generate([prompt], n)  # (tokens, time to the first, time for the rest)
        return (n - 1) / rest

    for mode in modes:  # llama.cpp's warm-up
        tok_s(engines[mode][1])
    rows = {m: [] for m in modes}
    for r in range(a.rounds):
        for mode in modes:
            o, t = tok_s(engines[mode][0]), tok_s(engines[mode][1])
            rows[mode].append({"ours": o, "llama.cpp": t, "ratio": o / t})
            print(f"round {r + 1}: {mode:8s} ours {o:6.1f} tok/s  llama.cpp {PAIRS[mode]:5s} {t:6.1f}  ratio {o / t:.2f}x",
                  flush=True)
    summary = {m: {"median_ratio": statistics.median(x["ratio"] for x in v),
                   "ours_median": statistics.median(x["ours"] for x in v),
                   "llama_cpp_median": statistics.median(x["llama.cpp"] for x in v), "rounds": v}
               for m, v in rows.items()}
    print("\n| ours (compiled) | llama.cpp | ours tok/s | llama.cpp tok/s | median of per-round ratios |")
    print("|---|---|---|---|---|")
    for m, s in summary.items():
        print(f"| {m} | {PAIRS[m].upper()} | {s['ours_median']:.1f} | {s['llama_cpp_median']:.1f} | "
              f"{s['median_ratio']:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps({"threads": a.threads, "new_tokens": n, "pairs": summary,
                                           "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
