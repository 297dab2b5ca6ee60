"""Batch-1 decode of our public API (`Llama.generate`) and llama.cpp, alternated inside one process.

    python bench/bench_engines.py --setup-only       # the exports this reads (same seeded model)
    python bench/paired_decode.py --rounds 5          # after it

Why a second harness: on a shared virtual machine the memory bandwidth drifts by +-20% over
minutes, and bench_engines.py runs each engine in its own process tens of seconds apart, so its
ratios carry that drift. Here each round times our engine and llama.cpp back to back on the same
prompt, a few hundred milliseconds apart, and the ratio is taken per round (then the median).
Both engines are warm (one warm-up call each, after which any compiled graphs and caches exist)
before the first round; both use the same number of threads. The engines are bench/engines.py's,
the very ones bench_engines.py times; greedy agreement with the float32 reference is its job.
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
PAIRS = {"float32": "f32", "bfloat16": "f16", "float16": "f16", "int8": "q8_0"}  # ours -> llama.cpp GGUF type


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/annotated-llama-bench")
    p.add_argument("--modes", default=",".join(PAIRS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    a = p.parse_args(argv)
    wd = Path(a.workdir)
    if not (wd / "spec.json").is_file():
        raise SystemExit(f"{wd}: no benchmark exports (run python bench/bench_engines.py --setup-only first)")
    modes = a.modes.split(",")
    if any(m not in PAIRS for m in modes):
        raise SystemExit(f"--modes: choose from {', '.join(PAIRS)}")
    if a.rounds < 1 or a.new_tokens < 2 or a.threads < 1:
        raise SystemExit("--rounds and --threads must be >= 1, --new-tokens >= 2")
    if a.out and Path(a.out).exists() and not a.force:
        raise SystemExit(f"--out {a.out}: already exists (pass --force to replace it)")

    import torch

    from engines import LlamaCppEngine, OursEngine
    from servers import commit_and_time, write_new

    torch.set_num_threads(a.threads)
    spec = json.loads((wd / "spec.json").read_text())
    prompt = spec["short_prompt"]
    n = a.new_tokens
    engines = {}
    for mode in modes:
        t = time.perf_counter()
        ours = OursEngine(wd, mode, max_batch_size=1)
        ours.generate([prompt], n)  # the warm-up call
        runner = ours.llm.engine.runner
        if hasattr(runner, "ready"):  # "auto": the compiled step builds in the background; time it, not eager
            runner.ready.wait(900)
        print(f"ours {mode}: loaded and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
        engines[mode] = (ours, LlamaCppEngine(wd, PAIRS[mode], a.threads, n_ctx=spec["context"]))

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
    print("\n| ours (Llama.generate) | llama.cpp | ours tok/s | llama.cpp tok/s | median of per-round ratios |")
    print("|---|---|---|---|---|")
    for m, s in summary.items():
        print(f"| {m} | {PAIRS[m].upper()} | {s['ours_median']:.1f} | {s['llama_cpp_median']:.1f} | "
              f"{s['median_ratio']:.2f}x |")
    if a.out:
        commit, date = commit_and_time()
        write_new(Path(a.out), json.dumps({"commit": commit, "date_utc": date, "threads": a.threads,
                                           "new_tokens": n, "pairs": summary}, indent=1), force=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
