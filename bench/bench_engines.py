"""Side-by-side speed of our public API, HF transformers and llama.cpp on the same random weights.

    python bench/bench_engines.py --force                 # the 134M shape, 3 rounds (writes bench/results.json)
    python bench/bench_engines.py --preset stories15M --reps 1 --new-tokens 16 --prompt-len 64 \\
        --engines ours-f32,llama.cpp-F32 --batches 1,8 --out /tmp/e.json      # a quick check

What it does, in order:
  1. builds one random-weight model (seeded) and exports it once per engine: our checkpoint dir
     (float32; int8/int4 dirs through annotated_llama.transforms.quantize), HF safetensors (save_model
     format="hf"), GGUF F32/F16/Q8_0 (save_model format="gguf") for llama.cpp through
     llama-cpp-python (`pip install -e ".[bench]"`);
  2. measures this machine's memory bandwidth (the batch-1 decode ceiling) in a fresh process;
  3. runs every engine (bench/engines.py: ours through `Llama.build` + `Llama.generate`, HF, llama.cpp)
     in a fresh subprocess, rounds interleaved (A B C A B C ...), medians. Decode tok/s: n - 1 new
     tokens over t(n) - t(1), t(k) one call making k tokens after a 16-token prompt (batch 1, after
     --warmups warm-up calls); prefill tok/s: a --prompt-len prompt; "load + 1st token" from before
     loading (after imports); batched decode of ours at --batches rows, B x (n - 1) / (t(n) - t(1));
  4. checks greedy outputs against a float32 reference computed here with Meta's forward contract
     (`model(tokens, start_pos)`, one token at a time) before any speed counts: equal, or parting
     only at a near-tie of the reference's top two logits (random weights give nearly flat logits,
     so low-precision rounding flips ties);
  5. prints the tables with the ratios the targets name and saves JSON (and markdown if asked).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import agreement, load_engine, reference_greedy  # noqa: E402
from servers import commit_and_time, write_new  # noqa: E402

TOKENIZER = ROOT / "tests" / "assets" / "llama-spm.model"

# engine: (family, precision, bytes per weight read at batch-1 decode)
ENGINES = {
    "ours-f32": ("ours", "float32", 4.0),
    "ours-bf16": ("ours", "bfloat16", 2.0),
    "ours-f16": ("ours", "float16", 2.0),
    "ours-int8": ("ours", "int8", 1.0 + 2 / 768),  # + one bf16 scale per row
    "ours-int4": ("ours", "int4", 0.5 + 4 / 128),  # + bf16 scale and min per group of 128
    "hf-f32": ("hf", "float32", 4.0),
    "hf-bf16": ("hf", "bfloat16", 2.0),
    "hf-f16": ("hf", "float16", 2.0),
    "llama.cpp-F32": ("llama.cpp", "f32", 4.0),
    "llama.cpp-F16": ("llama.cpp", "f16", 2.0),
    "llama.cpp-Q8_0": ("llama.cpp", "q8_0", 34 / 32),  # 32 int8 + one fp16 scale per block
}
DEFAULT_ENGINES = [e for e in ENGINES if e != "ours-int4"]
# near-tie tolerance for the greedy check: fraction of the reference logits' range
TIE_TOL = {"float32": 1e-3, "f32": 1e-3, "float16": 0.02, "bfloat16": 0.04, "f16": 0.02,
           "int8": 0.05, "q8_0": 0.05, "int4": 0.15}
# the pairs the targets name (issue 16): (ours, theirs, target ratio of decode tok/s)
PAIRS = [("ours-f32", "llama.cpp-F32", 1.0), ("ours-bf16", "llama.cpp-F16", 1.0),
         ("ours-f16", "llama.cpp-F16", 1.0), ("ours-int8", "llama.cpp-Q8_0", 1.0),
         ("ours-f32", "hf-f32", 3.0), ("ours-bf16", "hf-bf16", 3.0), ("ours-f16", "hf-f16", 3.0)]


# ---- workers: one engine per fresh process ---------------------------------------------------

def _rss_mb() -> float:
    # VmHWM: the peak resident set of this process image (ru_maxrss would carry the forking
    # driver's peak across exec on Linux)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return float("nan")


def worker(a) -> dict:
    family = ENGINES[a.worker][0]
    wd = Path(a.workdir)
    spec = json.loads((wd / "spec.json").read_text())
    # load + first token counts from here: the engine's Python imports come first, untimed
    if family == "llama.cpp":
        import llama_cpp  # noqa: F401
    else:
        import torch
        torch.set_num_threads(a.threads)
        if family == "hf":
            import transformers  # noqa: F401
        else:
            import annotated_llama.inference.generation  # noqa: F401
            import annotated_llama.weights  # noqa: F401
    t0 = time.perf_counter()
    eng = load_engine(family, ENGINES[a.worker][1], wd, a.threads, max_batch_size=max(spec["batches"]),
                      n_ctx=spec["context"])
    load_s = time.perf_counter() - t0
    short, long_, n, nb = spec["short_prompt"], spec["long_prompt"], spec["new_tokens"], spec["batched_new"]
    res = {"engine": a.worker, "load_s": load_s}
    if a.task == "batched":
        res["batched"] = {}
        for B in spec["batches"]:
            rows = spec["batch_prompts"][:B]
            for _ in range(spec["warmups"]):  # at this batch size and cache length
                eng.generate(rows, nb)
            _, _, dec = eng.generate(rows, nb)
            res["batched"][str(B)] = B * (nb - 1) / dec
        res["peak_rss_mb"] = _rss_mb()
        return res
    _, first, _ = eng.generate([short], 1)
    res["ttft_s"] = load_s + first  # loading plus the first token of a short prompt
    t = time.perf_counter()
    for _ in range(spec["warmups"]):
        eng.generate([short], n)  # at the timed run's cache length
    res["warmup_s"] = time.perf_counter() - t
    deadline = time.monotonic() + spec["wait_compiled"]
    while family == "ours" and eng.backend().get("compiled_ready") is False and time.monotonic() < deadline:
        time.sleep(0.5)  # --wait-compiled: the steady state, once a background compile is done
    before = eng.backend() if family == "ours" else {}
    toks, _, dec = eng.generate([short], n)
    if family == "ours":  # which steps of the timed call ran compiled (diagnostics, in the JSON)
        res["backend"] = {"before_timed_call": before, "after": eng.backend()}
    res["tokens"] = toks[0]
    res["decode_tok_s"] = (n - 1) / dec
    res["prefill_tok_s"] = len(long_) / min(eng.generate([long_], 1)[1] for _ in range(2))
    res["peak_rss_mb"] = _rss_mb()
    return res


def bandwidth_worker(a) -> dict:
    import torch
    torch.set_num_threads(a.threads)
    x = torch.ones(128 * 2**20)  # 512 MB of float32: far larger than any cache
    times = []
    for _ in range(6):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return {"read_gb_s": x.numel() * 4 / statistics.median(times[1:]) / 1e9}


# ---- the driver ------------------------------------------------------------------------------

def setup(a, wd: Path, engines: list[str]) -> tuple[dict, object]:
    import copy

    import torch
    from annotated_llama import ModelArgs, Tokenizer, Transformer, save_model
    from annotated_llama.transforms.quantize import quantize_model, save_quantized
    torch.manual_seed(a.seed)
    args = ModelArgs.from_name(a.preset)
    model = Transformer(args).eval()
    tok = Tokenizer(TOKENIZER)
    if args.vocab_size != tok.n_words:
        raise ValueError(f"--preset {a.preset}: vocab_size {args.vocab_size} != the tokenizer's {tok.n_words}")
    if a.prompt_len + 1 > args.max_seq_len or 16 + max(a.new_tokens, a.batched_new) > args.max_seq_len:
        raise ValueError(f"--prompt-len/--new-tokens: more than {a.preset}'s context of {args.max_seq_len}")
    wd.mkdir(parents=True, exist_ok=True)
    key = dict(preset=a.preset, seed=a.seed, new_tokens=a.new_tokens, prompt_len=a.prompt_len)
    spec_path = wd / "spec.json"
    old = json.loads(spec_path.read_text()) if a.reuse and spec_path.is_file() else {}
    g = torch.Generator().manual_seed(a.seed + 1)
    short = torch.randint(3, args.vocab_size, (16,), generator=g).tolist()
    long_ = torch.randint(3, args.vocab_size, (a.prompt_len,), generator=g).tolist()
    rows = [short] + torch.randint(3, args.vocab_size, (max(a.batches) - 1, 16), generator=g).tolist()
    same = bool(old) and all(old.get(k) == v for k, v in key.items())  # exports of this very model
    exported = set(old.get("exported", [])) if same else set()
    for e in engines:
        family, precision, _ = ENGINES[e]
        target = {"ours": "ours" if precision not in ("int8", "int4") else f"ours-{precision}",
                  "hf": "hf", "llama.cpp": f"model-{precision}.gguf"}[family]
        if target in exported:
            continue
        if target == "ours":
            save_model(model, tok, wd / "ours", format="ours", dtype="f32")
        elif target.startswith("ours-"):
            save_quantized(quantize_model(copy.deepcopy(model), precision), wd / target, tok.model_bytes())
        elif target == "hf":
            save_model(model, tok, wd / "hf", format="hf", dtype="f32")
        else:
            save_model(model, tok, wd / target, format="gguf", dtype=precision)
        exported.add(target)
    ref = old["reference"] if same else reference_greedy(model, short, a.new_tokens)
    spec = dict(key, short_prompt=short, long_prompt=long_, batch_prompts=rows, batches=a.batches,
                batched_new=a.batched_new, warmups=a.warmups, wait_compiled=a.wait_compiled, reference=ref, context=args.max_seq_len,
                n_params=args.num_params(), exported=sorted(exported),
                decode_weights=args.num_params() - args.vocab_size * args.dim)  # every weight but the embedding
    spec_path.write_text(json.dumps(spec))
    return spec, model


def run_worker(a, engine, task, wd):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, __file__, "--worker", engine, "--task", task, "--workdir", str(wd),
           "--threads", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"engine": engine, "error": (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]}
    if p.returncode != 0:  # measured, then the process failed on its way out: keep it, flagged
        res["exit_error"] = f"exit status {p.returncode}: " + (p.stderr.strip().splitlines() or ["?"])[-1]
    return res


def med(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--preset", default="bench-134m")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"of {', '.join(ENGINES)}")
    p.add_argument("--batched-engines", default="ours-f32,ours-bf16", help="ours-* engines timed at --batches")
    p.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmups", type=int, default=1, help="warm-up calls before each timed one (default 1)")
    p.add_argument("--wait-compiled", type=float, default=0, metavar="S",
                   help="before ours' timed call, wait up to S s for a background-compiled step to be ready")
    p.add_argument("--batches", type=ints, default=[1, 8, 16])
    p.add_argument("--batched-new", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/annotated-llama-bench")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--markdown", help="also write the tables as markdown to this file")
    p.add_argument("--force", action="store_true", help="replace existing --out / --markdown files")
    p.add_argument("--reuse", action="store_true", help="reuse the exports in --workdir from an earlier run")
    p.add_argument("--setup-only", action="store_true", help="write the exports and the reference, then stop")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--task", default="main", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return a
    engines, batched = [e for e in a.engines.split(",") if e], [e for e in a.batched_engines.split(",") if e]
    unknown = [e for e in engines + batched if e not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown engine {unknown[0]!r}; known: {', '.join(ENGINES)}")
    if any(ENGINES[e][0] != "ours" for e in batched):
        p.error("--batched-engines: only ours-* engines are timed batched")
    for flag in ("reps", "threads", "prompt_len", "new_tokens", "batched_new"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if a.warmups < 0 or not a.batches or min(a.batches) < 1:
        p.error("--warmups must be >= 0 and --batches positive")
    for f in (a.out, a.markdown):
        if f and Path(f).exists() and not a.force and not a.setup_only:
            p.error(f"{f}: already exists (pass --force to replace it, or choose --out/--markdown)")
    a.engine_list, a.batched_list = engines, batched
    return a


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        print(json.dumps(bandwidth_worker(a) if a.worker == "bandwidth" else worker(a)))
        return 0
    engines, batched = a.engine_list, a.batched_list
    wd = Path(a.workdir)
    print(f"setting up {a.preset} in {wd} ...", flush=True)
    try:
        spec, model = setup(a, wd, engines + batched)
    except ValueError as e:
        raise SystemExit(f"bench_engines.py: error: {e}")
    if a.setup_only:
        return 0
    rows, brows, bw = {e: [] for e in engines}, {e: [] for e in batched}, []
    for r in range(a.reps):  # interleaved: every engine once per round
        bw.append(run_worker(a, "bandwidth", "main", wd))
        for e in engines:
            res = run_worker(a, e, "main", wd)
            rows[e].append(res)
            print(f"round {r + 1}/{a.reps} {e}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in res.items() if isinstance(v, float))
                + "".join(f" {res[k]}" for k in ("error", "exit_error") if k in res), flush=True)
        for e in batched:
            res = run_worker(a, e, "batched", wd)
            brows[e].append(res)
            print(f"round {r + 1}/{a.reps} {e} batched: {res.get('batched', res.get('error'))}"
                  + (f" {res['exit_error']}" if "exit_error" in res else ""), flush=True)
    gbs = statistics.median([b["read_gb_s"] for b in bw if "read_gb_s" in b])
    summary = {}
    for e in engines:
        ok_rows = [x for x in rows[e] if "error" not in x]
        if not ok_rows:
            summary[e] = {"error": rows[e][0]["error"]}
            continue
        _, precision, bpw = ENGINES[e]
        agree, counted = agreement(model, spec["short_prompt"], ok_rows[0]["tokens"], spec["reference"], TIE_TOL[precision])
        ceiling = gbs * 1e9 / (spec["decode_weights"] * bpw)
        s = {k: med(ok_rows, k) for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb",
                                          "warmup_s")}
        s.update(greedy=agree, counted=counted, ceiling_tok_s=ceiling, runs=len(ok_rows))
        exits = sorted({x["exit_error"] for x in ok_rows if "exit_error" in x})
        if exits:
            s["exit_error"] = exits[0]
        if "backend" in ok_rows[0]:
            s["backend"] = ok_rows[0]["backend"]
        s["fraction_of_ceiling"] = s["decode_tok_s"] / ceiling
        summary[e] = s
    for e in batched:
        ok_rows = [x for x in brows[e] if "error" not in x]
        entry = summary.setdefault(e, {})
        if ok_rows:
            entry["batched_tok_s"] = {B: statistics.median(x["batched"][B] for x in ok_rows) for B in ok_rows[0]["batched"]}
        else:
            entry["batched_error"] = brows[e][0]["error"]
    commit, date = commit_and_time()
    result = {"commit": commit, "preset": a.preset, "params": spec["n_params"], "threads": a.threads,
              "reps": a.reps, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "warmups": a.warmups,
              "batched_new": a.batched_new, "bandwidth_gb_s": gbs, "engines": summary,
              "ratios": ratios(summary), "date_utc": date}
    text = table(result)
    print(text)
    write_new(Path(a.out), json.dumps(result, indent=1), force=True)
    if a.markdown:
        write_new(Path(a.markdown), text + "\n", force=True)
    return 0


def ratios(summary) -> list[dict]:
    out = []
    for ours, theirs, target in PAIRS:
        s, t = summary.get(ours, {}), summary.get(theirs, {})
        if "decode_tok_s" not in s or "decode_tok_s" not in t:
            continue
        out.append({"pair": f"{ours} / {theirs}", "target": target, "counted": s["counted"] and t["counted"],
                    "decode": s["decode_tok_s"] / t["decode_tok_s"],
                    "prefill": s["prefill_tok_s"] / t["prefill_tok_s"]})
    for e, s in summary.items():
        b = s.get("batched_tok_s", {})
        for B in b:
            if B != "1" and "1" in b:
                out.append({"pair": f"{e}: batch {B} / batch 1", "target": 5.0 if B == "8" else None,
                            "counted": True, "decode": b[B] / b["1"], "prefill": None})
    return out


def table(r) -> str:
    L = [f"Preset {r['preset']} ({r['params'] / 1e6:.0f}M params), {r['threads']} threads, median of {r['reps']} "
         f"interleaved rounds, {r['warmups']} warm-up call(s), commit {r['commit']}, {r['date_utc']} UTC. "
         f"Measured read bandwidth {r['bandwidth_gb_s']:.1f} GB/s.", "",
         f"| engine | decode tok/s (b=1, {r['new_tokens']} new) | % of ceiling | prefill tok/s ({r['prompt_len']}) | "
         f"load + 1st token s | warm-up s | peak RSS MB | greedy vs f32 reference |",
         "|---|---|---|---|---|---|---|---|"]
    notes = []
    for e, s in r["engines"].items():
        if "error" in s:
            L.append(f"| {e} | error: {s['error'][:80]} | | | | | | |")
        elif "decode_tok_s" in s:
            L.append(f"| {e} | {s['decode_tok_s']:.1f} | {100 * s['fraction_of_ceiling']:.0f}% of {s['ceiling_tok_s']:.0f} | "
                     f"{s['prefill_tok_s']:.0f} | {s['ttft_s']:.2f} | {s.get('warmup_s') or 0:.1f} | "
                     f"{s['peak_rss_mb']:.0f} | {s['greedy']} |")
            b = s.get("backend", {})
            if b.get("after", {}).get("calls") and b.get("before_timed_call", {}).get("calls"):
                d = {k: b["after"]["calls"][k] - b["before_timed_call"]["calls"].get(k, 0) for k in b["after"]["calls"]}
                notes.append(f"{e}: {b['after']['runner']}, compiled step ready before the timed calls: "
                             f"{b['before_timed_call'].get('compiled_ready')}; their forward calls: "
                             + ", ".join(f"{v} {k}" for k, v in d.items()))
            if "exit_error" in s:
                notes.append(f"{e}: measured, then the process ended with {s['exit_error'][:100]}")
    if notes:
        L += [""] + [f"- {x}" for x in notes]
    L += ["", "| ratio | decode | prefill | target | speed counted |", "|---|---|---|---|---|"]
    for x in r["ratios"]:
        tgt = f">= {x['target']:.0f}x" if x["target"] else "-"
        pre = f"{x['prefill']:.2f}x" if x["prefill"] else "-"
        L.append(f"| {x['pair']} | {x['decode']:.2f}x | {pre} | {tgt} | {'yes' if x['counted'] else 'NO'} |")
    for e, s in r["engines"].items():
        if "batched_tok_s" in s:
            cells = ", ".join(f"batch {B}: {v:.0f}" for B, v in s["batched_tok_s"].items())
            L += ["", f"Batched decode throughput through Llama.generate, {e} (tok/s, all rows, "
                      f"{r['batched_new']} new tokens): {cells}"]
        elif "batched_error" in s:
            L += ["", f"Batched decode, {e}: error: {s['batched_error'][:120]}"]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
