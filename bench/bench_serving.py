"""Serving throughput and time to first token: `annotated-llama serve` against llama.cpp's `llama-server`.

    bash bench/build_llama_server.sh /work/llamacpp-build          # once (~10 min on 2 cores)
    python bench/bench_serving.py --llama-server /work/llamacpp-build/bin/llama-server
    python bench/bench_serving.py --models default --rounds 1 --requests 1 --max-tokens 8 \\
        --out /tmp/s.json --markdown /tmp/s.md                     # a smoke run

For each model (the embedded default model; the 134M `bench-134m` shape with seeded random
weights) and each precision, the same weights are exported twice: our checkpoint dir (float32;
int8 through annotated_llama.transforms.quantize) and a GGUF (save_model format="gguf": F32 for float32, F16
for bfloat16/float16, Q8_0 for int8). Both servers start as subprocesses:
    ours:          annotated-llama serve --model DIR [--dtype D] --max-batch-size 16   (16 rows, as -np 16)
    llama-server:  llama-server -m M.gguf -np 16 -c <16 x context> -t T
with their default settings otherwise (ours gets OMP_NUM_THREADS=T, llama-server -t T).
Before timing, a few prompts are completed greedily by both and the texts compared (on F32 they
should be identical; lower precisions may part at near-ties).

Timing: for 1, 4 and 16 clients (asyncio + httpx), each client sends --requests streaming
completions of --max-tokens greedy tokens (temperature 0, ignore_eos) one after another; every
request has its own random prompt of --prompt-len token ids (BOS first), the same prompts for both
servers, so llama-server's prompt cache cannot reuse an earlier request. Per run: aggregate output
tokens/s (completion tokens of all clients over the wall time) and each request's time to its
first streamed text. Only one server is busy at a time: for each client count the pair runs back
to back, ours first in even rounds and llama-server first in odd ones; medians over --rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ROOT, Server, commit_and_time, free_port, llama_server_path, ours_command, write_new  # noqa: E402

MODELS = ("default", "bench-134m")
# our precision -> (GGUF type name in llama.cpp, save_model dtype)
PRECISIONS = {"float32": ("F32", "f32"), "bfloat16": ("F16", "f16"), "float16": ("F16", "f16"),
              "int8": ("Q8_0", "q8_0")}
SLOTS = 16  # llama-server -np; ours --max-batch-size
CHECK_PROMPTS = ["In the beginning God created", "And the LORD said unto Moses,", "Once upon a time",
                 "The king of Israel"]


def prepare(name: str, precisions: list[str], wd: Path, seed: int):
    """Export `name` for both servers: {precision: (our dir, extra serve flags, gguf)}, context, tokenizer."""
    import torch
    from annotated_llama import ModelArgs, Tokenizer, Transformer, save_model
    from annotated_llama.transforms.quantize import quantize_model, save_quantized
    from annotated_llama.weights import load_model
    if name == "default":
        from annotated_llama.default_model import default_model_dir
        model, tok = load_model(default_model_dir(), dtype="float32")
    else:
        torch.manual_seed(seed)
        model = Transformer(ModelArgs.from_name(name)).eval()
        tok = Tokenizer(ROOT / "tests" / "assets" / "llama-spm.model")
    wd.mkdir(parents=True, exist_ok=True)
    ours_f32 = save_model(model, tok, wd / "ours-f32", format="ours", dtype="f32")
    out = {}
    for p in precisions:
        gguf_type, dtype = PRECISIONS[p]
        gguf = wd / f"{name}-{gguf_type}.gguf"
        if not gguf.exists():
            save_model(model, tok, gguf, format="gguf", dtype=dtype)
        if p == "int8":
            import copy
            save_quantized(quantize_model(copy.deepcopy(model), "int8"), wd / "ours-int8", tok.model_bytes())
            out[p] = (wd / "ours-int8", [], gguf)  # non-quantized tensors stay float32 (load_quantized)
        else:
            out[p] = (ours_f32, ["--dtype", p], gguf)
    return out, model.params.max_seq_len, tok


# ---- one client's requests, streamed ---------------------------------------------------------

async def complete(client, url: str, prompt: list[int], max_tokens: int, stream: bool = True) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    first, pieces, usage = None, [], None
    if not stream:
        r = await client.post(url + "/v1/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:200]}")
        out = r.json()
        return {"text": out["choices"][0]["text"], "usage": out.get("usage")}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{url}: error in the stream: {chunk['error']}")
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    first = first or time.perf_counter()
                    pieces.append(choice["text"])
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError(f"{url}: the stream carried no usage (completion token count)")
    if usage["completion_tokens"] != max_tokens or usage["prompt_tokens"] != len(prompt):
        raise RuntimeError(f"{url}: asked {len(prompt)} prompt + {max_tokens} new tokens (ignore_eos), got "
                           f"{usage['prompt_tokens']} + {usage['completion_tokens']}")
    return {"ttft_s": (first or end) - t0, "seconds": end - t0, "completion_tokens": usage["completion_tokens"]}


async def drive(url: str, n_clients: int, prompts: list[list[list[int]]], max_tokens: int) -> dict:
    import httpx
    limits = httpx.Limits(max_connections=n_clients + 2, max_keepalive_connections=n_clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        async def one_client(i):
            return [await complete(client, url, p, max_tokens) for p in prompts[i]]
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(i) for i in range(n_clients)))
        wall = time.perf_counter() - t0
    reqs = [r for rs in per_client for r in rs]
    tokens = sum(r["completion_tokens"] for r in reqs)
    return {"clients": n_clients, "requests": len(reqs), "completion_tokens": tokens, "seconds": wall,
            "tok_s": tokens / wall, "ttft_s": [r["ttft_s"] for r in reqs]}


def random_prompts(tag: str, n_clients: int, requests: int, length: int, bos: int, n_words: int):
    """[client][request] -> token ids; deterministic in `tag` (str seeds are hashed with sha512)."""
    rng = random.Random(tag)
    return [[[bos] + [rng.randrange(3, n_words) for _ in range(length - 1)] for _ in range(requests)]
            for _ in range(n_clients)]


def agreement(servers, tok, max_tokens: int) -> dict:
    """Greedy texts of both servers on CHECK_PROMPTS: identical, or where they part."""
    import httpx

    async def texts(url):
        async with httpx.AsyncClient(timeout=600) as c:
            return [(await complete(c, url, tok.encode(p, bos=True, eos=False), max_tokens, stream=False))["text"]
                    for p in CHECK_PROMPTS]
    ours, theirs = (asyncio.run(texts(s.url)) for s in servers)
    rows = []
    for a, b in zip(ours, theirs):
        j = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        rows.append("identical" if a == b else f"part at char {j if j is not None else min(len(a), len(b))}")
    return {"identical": sum(r == "identical" for r in rows), "of": len(rows), "rows": rows,
            "ours": ours, "llama_server": theirs}


def decode_counters(server: Server):
    """(decode steps, rows decoded) from /health's scheduler counters where the server reports them."""
    sched = server.health().get("scheduler")
    if isinstance(sched, dict) and isinstance(sched.get("steps"), int) and isinstance(sched.get("batch_rows"), int):
        return sched["steps"], sched["batch_rows"]
    return None


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def bench_pair(a, name, precision, export, ctx, tok, wd: Path, server_bin: Path) -> dict:
    ours_dir, ours_flags, gguf = export
    po, pl = free_port(), free_port()
    ours = Server("ours", ours_command(ours_dir, po, *ours_flags, "--max-batch-size", str(SLOTS)), po,
                  wd / f"ours-{precision}.log", env={"OMP_NUM_THREADS": str(a.threads)})
    theirs = Server("llama-server", [str(server_bin), "-m", str(gguf), "-np", str(SLOTS), "-c", str(SLOTS * ctx),
                                     "--host", "127.0.0.1", "--port", str(pl), "-t", str(a.threads)], pl,
                    wd / f"llama-server-{precision}.log")
    if a.prompt_len + a.max_tokens > ctx:
        raise ValueError(f"--prompt-len + --max-tokens = {a.prompt_len + a.max_tokens} exceeds {name}'s "
                         f"context of {ctx}")
    with ours, theirs:
        print(f"[{name} {precision}] up: ours in {ours.start_s:.1f} s, llama-server in {theirs.start_s:.1f} s",
              flush=True)
        decode, waited = ours.wait_decode_ready()  # time the compiled step, not the eager one before it
        print(f"[{name} {precision}] ours: decode {decode} after {waited:.0f} s more", flush=True)
        agree = agreement((ours, theirs), tok, a.max_tokens)
        print(f"[{name} {precision}] greedy texts, ours vs llama-server: {agree['identical']}/{agree['of']} "
              f"identical ({', '.join(agree['rows'])})", flush=True)
        for s in (ours, theirs):  # warm-up: every client count once, short answers
            for c in a.clients:
                asyncio.run(drive(s.url, c, random_prompts(f"warm-{c}", c, 1, a.prompt_len, tok.bos_id,
                                                           tok.n_words), 4))
        runs = {s.name: {c: [] for c in a.clients} for s in (ours, theirs)}
        for r in range(a.rounds):
            for c in a.clients:
                prompts = random_prompts(f"{name}-{r}-{c}", c, a.requests, a.prompt_len, tok.bos_id, tok.n_words)
                for s in ((ours, theirs) if r % 2 == 0 else (theirs, ours)):
                    before = decode_counters(s)
                    res = asyncio.run(drive(s.url, c, prompts, a.max_tokens))
                    after = decode_counters(s)
                    if before and after and after[0] > before[0]:  # our scheduler's rows per decode step
                        res["mean_batch"] = (after[1] - before[1]) / (after[0] - before[0])
                    runs[s.name][c].append(res)
                    print(f"[{name} {precision}] round {r + 1}/{a.rounds} {s.name:12s} {c:2d} clients: "
                          f"{res['tok_s']:7.1f} tok/s, TTFT p50 {1e3 * statistics.median(res['ttft_s']):.0f} ms"
                          + (f", mean batch {res['mean_batch']:.1f}" if "mean_batch" in res else ""), flush=True)
        peak = {s.name: s.peak_rss_mib() for s in (ours, theirs)}
        health = ours.health()
    rows = []
    for c in a.clients:
        o, t = runs["ours"][c], runs["llama-server"][c]
        ot = [x for run in o for x in run["ttft_s"]]
        tt = [x for run in t for x in run["ttft_s"]]
        rows.append({"clients": c, "ours_tok_s": statistics.median(x["tok_s"] for x in o),
                     "llama_tok_s": statistics.median(x["tok_s"] for x in t),
                     "ratio": statistics.median(x["tok_s"] / y["tok_s"] for x, y in zip(o, t)),
                     "ours_ttft_p50": statistics.median(ot), "ours_ttft_p90": pct(ot, 0.9),
                     "llama_ttft_p50": statistics.median(tt), "llama_ttft_p90": pct(tt, 0.9)})
    by_c = {r["clients"]: r for r in rows}
    lo, hi = min(a.clients), max(a.clients)
    return {"model": name, "precision": precision, "gguf": PRECISIONS[precision][0], "context": ctx,
            "ours_decode": decode, "compile_wait_s": waited, "agreement": agree, "rows": rows, "peak_rss_mib": peak, "ours_health_after": health,
            "scaling": {"clients": [lo, hi], "ours": by_c[hi]["ours_tok_s"] / by_c[lo]["ours_tok_s"],
                        "llama_server": by_c[hi]["llama_tok_s"] / by_c[lo]["llama_tok_s"]},
            "runs": {k: {str(c): v for c, v in d.items()} for k, d in runs.items()}}


def markdown(res: dict) -> str:
    a = res["settings"]
    L = [f"Serving, `bench/bench_serving.py` at commit {res['commit']}, {res['date_utc']} UTC: "
         f"{a['rounds']} round(s), {a['requests']} request(s) per client, {a['max_tokens']} new tokens after a "
         f"{a['prompt_len']}-token prompt, {a['threads']} threads per server; ours `serve --max-batch-size {SLOTS}`, "
         f"llama-server `-np {SLOTS} -c {SLOTS}x<context>`; medians (ratio: median of per-round ratios).", "",
         "| model | precision | clients | ours tok/s | llama-server tok/s | ours / llama-server (target >= 1.0): median "
         "of per-round ratios (ratio of medians) "
         "| TTFT p50 / p90 ms, ours | TTFT p50 / p90 ms, llama-server | TTFT p50 ours / theirs |",
         "|---|---|---|---|---|---|---|---|---|"]
    for b in res["benchmarks"]:
        if "error" in b:
            L.append(f"| {b['model']} | {b['precision']} | error: {b['error'][:120]} | | | | | | |")
            continue
        for r in b["rows"]:
            L.append(f"| {b['model']} | {b['precision']} vs {b['gguf']} | {r['clients']} | {r['ours_tok_s']:.1f} | "
                     f"{r['llama_tok_s']:.1f} | {r['ratio']:.2f}x ({r['ours_tok_s'] / r['llama_tok_s']:.2f}x) | {1e3 * r['ours_ttft_p50']:.0f} / "
                     f"{1e3 * r['ours_ttft_p90']:.0f} | {1e3 * r['llama_ttft_p50']:.0f} / "
                     f"{1e3 * r['llama_ttft_p90']:.0f} | {r['ours_ttft_p50'] / r['llama_ttft_p50']:.2f}x |")
    L.append("")
    for b in res["benchmarks"]:
        if "error" in b:
            continue
        s, g = b["scaling"], b["agreement"]
        L.append(f"- {b['model']} {b['precision']}: ours {s['clients'][1]} clients / {s['clients'][0]} = "
                 f"{s['ours']:.2f}x (target >= 8x; llama-server {s['llama_server']:.2f}x); greedy texts "
                 f"identical on {g['identical']}/{g['of']} prompts; peak RSS ours {b['peak_rss_mib']['ours']:.0f} MiB, "
                 f"llama-server {b['peak_rss_mib']['llama-server']:.0f} MiB")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-server", help="llama.cpp's llama-server binary (default: $LLAMA_SERVER)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--precisions", default="float32", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=4, help="completions per client per run (default 4)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="random weights of bench-134m")
    p.add_argument("--workdir", help="exports and server logs (default: a temporary dir, removed after)")
    p.add_argument("--out", default=str(ROOT / "bench" / "serving_results.json"))
    p.add_argument("--markdown", default=str(ROOT / "bench" / "serving_results.md"))
    p.add_argument("--force", action="store_true", help="replace existing --out / --markdown files")
    a = p.parse_args(argv)
    try:
        models = [m for m in a.models.split(",") if m]
        precisions = [x for x in a.precisions.split(",") if x]
        a.clients = [int(c) for c in a.clients.split(",") if c]
        bad = [m for m in models if m not in MODELS] + [x for x in precisions if x not in PRECISIONS]
        if bad:
            raise ValueError(f"--models/--precisions: unknown {bad[0]!r} (models: {', '.join(MODELS)}; "
                             f"precisions: {', '.join(PRECISIONS)})")
        for flag in ("requests", "max_tokens", "prompt_len", "rounds", "threads"):
            if getattr(a, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
        if not a.clients or min(a.clients) < 1 or max(a.clients) > SLOTS:
            raise ValueError(f"--clients: between 1 and {SLOTS} each, got {a.clients}")
        for f in (a.out, a.markdown):
            if Path(f).exists() and not a.force:
                raise ValueError(f"{f}: already exists (pass --force to replace it, or choose --out/--markdown)")
        server_bin = llama_server_path(a.llama_server)
    except ValueError as e:
        raise SystemExit(f"bench_serving.py: error: {e}")
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="bench-serving-"))
    commit, date = commit_and_time()
    benchmarks = []
    try:
        for name in models:
            print(f"exporting {name} ({', '.join(precisions)}) to {wd / name} ...", flush=True)
            exports, ctx, tok = prepare(name, precisions, wd / name, a.seed)
            for prec in precisions:
                try:
                    benchmarks.append(bench_pair(a, name, prec, exports[prec], ctx, tok, wd / name, server_bin))
                except (RuntimeError, OSError) as e:
                    print(f"[{name} {prec}] FAILED: {e}", flush=True)
                    benchmarks.append({"model": name, "precision": prec, "error": str(e)})
    finally:
        if not a.workdir:
            shutil.rmtree(wd, ignore_errors=True)
    res = {"commit": commit, "date_utc": date, "llama_server": str(server_bin),
           "settings": {k: getattr(a, k) for k in ("rounds", "requests", "max_tokens", "prompt_len", "threads",
                                                   "clients", "seed")},
           "benchmarks": benchmarks}
    text = markdown(res)
    print("\n" + text)
    write_new(Path(a.out), json.dumps(res, indent=1), force=True)
    write_new(Path(a.markdown), text + "\n", force=True)
    print(f"\nwrote {a.out} and {a.markdown}")
    return 1 if any("error" in b for b in benchmarks) else 0


if __name__ == "__main__":
    sys.exit(main())
