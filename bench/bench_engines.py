"""Side-by-side speed of our model, HF transformers and llama.cpp on the same random weights.

    python bench/bench_engines.py                      # the 134M shape of shared/MACHINE.md, 3 rounds
    python bench/bench_engines.py --preset stories15M --reps 1 --new-tokens 32   # a quick check

What it does, in order:
  1. builds one random-weight model (seeded), and exports it once per engine: our dir (float32,
     and int8/int4 checkpoints from annotated_llama.quantize), HF safetensors (save_model
     format="hf"), GGUF F32/F16/Q8_0 (save_model format="gguf") for llama.cpp through
     llama-cpp-python (`pip install -e ".[bench]"`);
  2. measures this machine's memory bandwidth (the batch-1 decode ceiling) in a fresh process;
  3. runs every engine in a fresh subprocess, rounds interleaved (A B C A B C ...), and
     takes medians: prefill tok/s (a 512-token prompt), decode tok/s (128 new tokens,
     batch 1), load + first token, peak RSS; batched decode at batch 1/4/8/16 for ours;
  4. checks greedy outputs against a float32 reference of the plain model (no KV cache tricks)
     before any speed counts: equal, or parting only at a near-tie of the reference's top two
     logits (random weights give nearly flat logits, so low-precision rounding flips ties);
  5. prints a table with ratios against the targets and saves JSON (and markdown if asked).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "data" / "llama-spm.model"

# engine: (family, precision, bytes per weight read at batch-1 decode)
ENGINES = {
    "ours-plain-f32": ("ours", "float32", 4.0),  # model.forward one token at a time: the baseline
    "ours-f32": ("ours", "float32", 4.0),
    "ours-mixed": ("ours", "mixed", 2.0),  # eager: float16 decode, bfloat16 prefill
    "ours-int8": ("ours", "int8", 1.0 + 2 / 768),  # + one bf16 scale per row
    "ours-int4": ("ours", "int4", 0.5 + 4 / 128),  # + bf16 scale and zero per group of 128
    # the batch-1 decode step through torch.compile (FastDecoder(compile=True)); prefill and
    # batches > 1 stay eager (bfloat16: on oneDNN-packed weights)
    "ours-f32-compiled": ("ours", "float32", 4.0),
    "ours-bf16-compiled": ("ours", "bfloat16", 2.0),
    "ours-int8-compiled": ("ours", "int8", 1.0 + 2 / 768),
    "ours-int4-compiled": ("ours", "int4", 0.5 + 4 / 128),
    "hf-f32": ("hf", "float32", 4.0),
    "hf-bf16": ("hf", "bfloat16", 2.0),
    "llama.cpp-F32": ("llama.cpp", "f32", 4.0),
    "llama.cpp-F16": ("llama.cpp", "f16", 2.0),
    "llama.cpp-Q8_0": ("llama.cpp", "q8_0", 34 / 32),  # 32 int8 + one fp16 scale per block
}
# near-tie tolerance for the greedy check: fraction of the reference logits' range
TIE_TOL = {"float32": 1e-3, "f32": 1e-3, "mixed": 0.02, "float16": 0.02, "bfloat16": 0.04, "f16": 0.02,
           "int8": 0.05, "q8_0": 0.05, "int4": 0.15}
# the pairs the targets name: (ours, theirs, target ratio)
PAIRS = [("ours-f32-compiled", "llama.cpp-F32", 1.0), ("ours-bf16-compiled", "llama.cpp-F16", 1.0),
         ("ours-int8-compiled", "llama.cpp-Q8_0", 1.0), ("ours-f32-compiled", "hf-f32", 3.0),
         ("ours-bf16-compiled", "hf-bf16", 3.0), ("ours-bf16-compiled", "hf-f32", 3.0),
         ("ours-f32", "llama.cpp-F32", 1.0), ("ours-mixed", "llama.cpp-F16", 1.0),
         ("ours-int8", "llama.cpp-Q8_0", 1.0), ("ours-f32-compiled", "ours-plain-f32", None),
         ("ours-bf16-compiled", "ours-mixed", None)]


# ---- workers: one engine per fresh process ---------------------------------------------------

def _rss_mb() -> float:
    # VmHWM: the peak resident set of this process image (ru_maxrss would carry the forking
    # driver's peak across exec on Linux)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class OursEngine:
    def __init__(self, wd: Path, precision: str, plain: bool, matvec=None, compile: bool = False):
        import torch
        from annotated_llama.fast import FastDecoder
        self.torch, self.plain = torch, plain
        if precision in ("int8", "int4"):
            from annotated_llama.quantize import load_quantized
            model = load_quantized(wd / f"ours-{precision}")
        else:
            from annotated_llama import load_model
            model, _ = load_model(wd / "ours", dtype="float32")
        self.model = model.eval()
        # compile: built at the first decode step (the warm-up), so not in load + first token
        self.fd = None if plain else FastDecoder(self.model, precision, matvec=matvec, compile=compile)

    def generate(self, prompts, n):
        """(new tokens per row, seconds to the first token, seconds for the rest)."""
        if self.plain:
            return self._plain(prompts[0], n)
        out = self.fd.generate(prompts, n)
        return out, self.fd.stats["prefill_s"], self.fd.stats["decode_s"]

    def _plain(self, prompt, n):
        torch = self.torch
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = self.model(torch.tensor([prompt]), 0)[0, -1]
            tok = int(logits.argmax())
            t1 = time.perf_counter()
            out = [tok]
            for i in range(n - 1):
                tok = int(self.model(torch.tensor([[tok]]), len(prompt) + i)[0, -1].argmax())
                out.append(tok)
        return [out], t1 - t0, time.perf_counter() - t1


class HFEngine:
    def __init__(self, wd: Path, precision: str):
        import torch
        from transformers import LlamaForCausalLM
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(wd / "hf", dtype=getattr(torch, precision)).eval()

    def generate(self, prompts, n):
        torch = self.torch
        with torch.no_grad():  # the minimal HF loop: forward with past_key_values, argmax
            t0 = time.perf_counter()
            out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            toks = [tok]
            for _ in range(n - 1):
                out = self.model(tok[:, None], past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1].argmax(-1)
                toks.append(tok)
        return torch.stack(toks, 1).tolist(), t1 - t0, time.perf_counter() - t1


class LlamaCppEngine:
    def __init__(self, wd: Path, precision: str, threads: int):
        import numpy as np
        from llama_cpp import Llama
        self.np = np
        self.llm = Llama(model_path=str(wd / f"model-{precision}.gguf"), n_ctx=1024, n_batch=512, n_ubatch=512,
                         n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)

    def _argmax_last(self) -> int:
        # with logits_all=False, Llama.eval no longer copies logits into .scores: read
        # llama.cpp's buffer for the last token in place (no copy)
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def generate(self, prompts, n):
        llm = self.llm
        (prompt,) = prompts
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._argmax_last()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = self._argmax_last()
            out.append(tok)
        return [out], t1 - t0, time.perf_counter() - t1


def worker(a) -> dict:
    a.engine = a.worker
    family, precision, _ = ENGINES[a.engine]
    wd = Path(a.workdir)
    spec = json.loads((wd / "spec.json").read_text())
    # load + first token counts from here: the engine's Python imports come first, untimed
    if family == "ours":
        import annotated_llama.fast  # noqa: F401  (imports torch)
        import annotated_llama.quantize  # noqa: F401
    elif family == "hf":
        import transformers  # noqa: F401
    else:
        import llama_cpp  # noqa: F401
    t0 = time.perf_counter()
    if family == "ours":
        import torch
        torch.set_num_threads(a.threads)
        eng = OursEngine(wd, precision, plain=a.engine == "ours-plain-f32", matvec=spec["matvec"],
                         compile=a.engine.endswith("-compiled"))
    elif family == "hf":
        import torch
        torch.set_num_threads(a.threads)
        eng = HFEngine(wd, precision)
    else:
        eng = LlamaCppEngine(wd, precision, a.threads)
    load_s = time.perf_counter() - t0
    short, long_ = spec["short_prompt"], spec["long_prompt"]
    res = {"engine": a.engine, "load_s": load_s}
    if a.task == "batched":
        res["batched"] = {}
        for B in spec["batches"]:
            for _ in range(2):  # warm-up at this batch size and cache length (compiles batch 1)
                eng.generate([short] * B, spec["batched_new"])
            _, _, dec = eng.generate([short] * B, spec["batched_new"])
            res["batched"][str(B)] = B * (spec["batched_new"] - 1) / dec
        res["peak_rss_mb"] = _rss_mb()
        return res
    _, first, _ = eng.generate([short], 1)
    res["ttft_s"] = load_s + first  # loading plus the first token of a short prompt
    t = time.perf_counter()
    eng.generate([short], spec["new_tokens"])  # warm-up (compiles) at the timed run's cache length
    res["warmup_s"] = time.perf_counter() - t
    if a.engine.endswith("-compiled"):
        eng.generate([short], spec["new_tokens"])  # the first runs after a compile are still slow
    toks, _, dec = eng.generate([short], spec["new_tokens"])
    res["tokens"] = toks[0]
    res["decode_tok_s"] = (spec["new_tokens"] - 1) / dec
    pre = [eng.generate([long_], 1)[1] for _ in range(2)]
    res["prefill_tok_s"] = len(long_) / min(pre)
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

def setup(a, wd: Path, reuse: bool = False) -> dict:
    import torch
    from annotated_llama import ModelArgs, Tokenizer, Transformer, save_model
    from annotated_llama.quantize import quantize_model, save_quantized
    from annotated_llama.speculative import greedy_generate
    torch.manual_seed(a.seed)
    args = ModelArgs.from_name(a.preset)
    model = Transformer(args).eval()
    tok = Tokenizer(TOKENIZER)
    if args.vocab_size != tok.n_words:
        raise ValueError(f"--preset {a.preset}: vocab_size {args.vocab_size} != the tokenizer's {tok.n_words}")
    wd.mkdir(parents=True, exist_ok=True)
    if reuse and (wd / "spec.json").is_file():  # exports of the same seeded model from an earlier run
        spec = json.loads((wd / "spec.json").read_text())
        same = (spec["preset"], spec["seed"], spec["new_tokens"], len(spec["long_prompt"])) == \
            (a.preset, a.seed, a.new_tokens, a.prompt_len)
        if same:
            spec.update(batches=a.batches, batched_new=a.batched_new, matvec=a.matvec)
            (wd / "spec.json").write_text(json.dumps(spec))
            return spec, model
    engines = a.engines.split(",")
    save_model(model, tok, wd / "ours", format="ours", dtype="f32")
    if any(e.startswith("hf-") for e in engines):
        save_model(model, tok, wd / "hf", format="hf", dtype="f32")
    for e in engines:
        family, precision, _ = ENGINES[e]
        if family == "llama.cpp":
            save_model(model, tok, wd / f"model-{precision}.gguf", format="gguf", dtype=precision)
        if family == "ours" and precision in ("int8", "int4"):
            import copy
            save_quantized(quantize_model(copy.deepcopy(model), precision), wd / f"ours-{precision}")
    g = torch.Generator().manual_seed(a.seed + 1)
    short = torch.randint(3, args.vocab_size, (16,), generator=g).tolist()
    long_ = torch.randint(3, args.vocab_size, (a.prompt_len,), generator=g).tolist()
    # the reference: plain float32 greedy of the model itself
    ref = greedy_generate(model, short, a.new_tokens)
    spec = dict(short_prompt=short, long_prompt=long_, new_tokens=a.new_tokens, batches=a.batches,
                batched_new=a.batched_new, reference=ref, matvec=a.matvec, preset=a.preset, seed=a.seed,
                n_params=args.num_params(),
                decode_weights=args.num_params() - args.vocab_size * args.dim)  # every weight but the embedding
    (wd / "spec.json").write_text(json.dumps(spec))
    return spec, model


def agreement(model, prompt, tokens, ref, tol) -> tuple[str, bool]:
    import torch
    j = next((i for i, (x, y) in enumerate(zip(tokens, ref)) if x != y), None)
    if j is None:
        return ("exact", True) if len(tokens) == len(ref) else (f"length {len(tokens)}", False)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ref[:j]]), cache=False)[0, -1]
    top2 = logits.topk(2).values
    gap = float((top2[0] - top2[1]) / (logits.max() - logits.min()))
    if gap < tol:
        return f"to token {j} (then a near-tie: gap {gap:.1e})", True
    return f"DIFFERS at token {j} (gap {gap:.1e})", False


def run_worker(a, engine, task, wd):
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    cmd = [sys.executable, __file__, "--worker", engine, "--task", task, "--workdir", str(wd),
           "--threads", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode != 0:
        return {"engine": engine, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def med(rows, key):
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench-134m")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--batched-engines", default="ours-bf16-compiled,ours-mixed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    p.add_argument("--batched-new", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matvec", default=None, choices=("linear", "mv", "reduce"),
                   help="our batch-1 decode matmuls (FastDecoder's matvec; default: multiply-and-sum when "
                        "compiled, else F.linear)")
    p.add_argument("--workdir", default="/tmp/annotated-llama-bench")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--reuse", action="store_true", help="reuse the exports in --workdir from an earlier run")
    p.add_argument("--setup-only", action="store_true", help="write the exports and the reference, then stop")
    p.add_argument("--markdown", help="also write the table as markdown to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--task", default="main", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(bandwidth_worker(a) if a.worker == "bandwidth" else worker(a)))
        return 0
    unknown = [e for e in a.engines.split(",") + a.batched_engines.split(",") if e and e not in ENGINES]
    if unknown:
        raise SystemExit(f"--engines: unknown engine {unknown[0]!r}; known: {', '.join(ENGINES)}")
    wd = Path(a.workdir)
    print(f"setting up {a.preset} in {wd} ...", flush=True)
    spec, model = setup(a, wd, reuse=a.reuse)
    if a.setup_only:
        return 0
    engines = a.engines.split(",")
    batched = [e for e in a.batched_engines.split(",") if e]
    rows = {e: [] for e in engines}
    brows = {e: [] for e in batched}
    bw = []
    for r in range(a.reps):  # interleaved: every engine once per round
        bw.append(run_worker(a, "bandwidth", "main", wd))
        for e in engines:
            res = run_worker(a, e, "main", wd)
            rows[e].append(res)
            print(f"round {r + 1}/{a.reps} {e}: " + ", ".join(
                f"{k} {v:.3g}" for k, v in res.items() if isinstance(v, float)) + (f" {res['error']}" if "error" in res else ""),
                flush=True)
        for e in batched:
            res = run_worker(a, e, "batched", wd)
            brows[e].append(res)
            print(f"round {r + 1}/{a.reps} {e} batched: {res.get('batched', res.get('error'))}", flush=True)
    gbs = statistics.median([b["read_gb_s"] for b in bw if "read_gb_s" in b])
    summary = {}
    for e in engines:
        ok_rows = [r for r in rows[e] if "error" not in r]
        if not ok_rows:
            summary[e] = {"error": rows[e][0]["error"]}
            continue
        family, precision, bpw = ENGINES[e]
        agree, counted = agreement(model, spec["short_prompt"], ok_rows[0]["tokens"], spec["reference"], TIE_TOL[precision])
        ceiling = gbs * 1e9 / (spec["decode_weights"] * bpw)
        s = {k: med(ok_rows, k) for k in ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s", "peak_rss_mb",
                                          "warmup_s")}
        s.update(greedy=agree, counted=counted, ceiling_tok_s=ceiling, runs=len(ok_rows))
        s["fraction_of_ceiling"] = s["decode_tok_s"] / ceiling
        summary[e] = s
    for e in batched:
        ok_rows = [r for r in brows[e] if "error" not in r]
        if ok_rows:
            summary.setdefault(e, {})["batched_tok_s"] = {
                B: statistics.median(r["batched"][B] for r in ok_rows) for B in ok_rows[0]["batched"]}
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "preset": a.preset, "matvec": a.matvec, "params": spec["n_params"], "threads": a.threads,
              "reps": a.reps, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "bandwidth_gb_s": gbs, "engines": summary, "ratios": ratios(summary),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    Path(a.out).write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if a.markdown:
        Path(a.markdown).write_text(text + "\n")
    return 0


def ratios(summary) -> list[dict]:
    out = []
    for ours, theirs, target in PAIRS:
        s, t = summary.get(ours, {}), summary.get(theirs, {})
        if "decode_tok_s" not in s or "decode_tok_s" not in t:
            continue
        counted = s["counted"] and t["counted"]
        out.append({"pair": f"{ours} / {theirs}", "target": target, "counted": counted,
                    "decode": s["decode_tok_s"] / t["decode_tok_s"],
                    "prefill": s["prefill_tok_s"] / t["prefill_tok_s"]})
    return out


def table(r) -> str:
    L = [f"Preset {r['preset']} ({r['params'] / 1e6:.0f}M params), {r['threads']} threads, median of {r['reps']} "
         f"interleaved rounds, commit {r['commit']}, {r['date_utc']} UTC. Measured read bandwidth "
         f"{r['bandwidth_gb_s']:.1f} GB/s.", "",
         f"| engine | decode tok/s (b=1) | % of ceiling | prefill tok/s ({r['prompt_len']}) | load + 1st token s | "
         f"warm-up s (compile) | peak RSS MB | greedy vs f32 reference |",
         "|---|---|---|---|---|---|---|---|"]
    for e, s in r["engines"].items():
        if "error" in s:
            L.append(f"| {e} | error: {s['error'][:80]} | | | | | | |")
            continue
        if "decode_tok_s" not in s:
            continue
        L.append(f"| {e} | {s['decode_tok_s']:.1f} | {100 * s['fraction_of_ceiling']:.0f}% of {s['ceiling_tok_s']:.0f} | "
                 f"{s['prefill_tok_s']:.0f} | {s['ttft_s']:.2f} | {s.get('warmup_s') or 0:.1f} | {s['peak_rss_mb']:.0f} | "
                 f"{s['greedy']} |")
    L += ["", "| ratio | decode | prefill | target | speed counted |", "|---|---|---|---|---|"]
    for x in r["ratios"]:
        tgt = f">= {x['target']:.0f}x" if x["target"] else "-"
        L.append(f"| {x['pair']} | {x['decode']:.2f}x | {x['prefill']:.2f}x | {tgt} | {'yes' if x['counted'] else 'NO'} |")
    for e, s in r["engines"].items():
        if "batched_tok_s" in s:
            b = s["batched_tok_s"]
            cells = ", ".join(f"batch {B}: {v:.0f}" for B, v in b.items())
            ratio = f"; batch 8 / batch 1 = {b['8'] / b['1']:.2f}x (target >= 5x)" if "8" in b and "1" in b else ""
            L += ["", f"Batched decode throughput, {e} (tok/s, all rows): {cells}{ratio}"]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
