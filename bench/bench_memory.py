"""Serving memory with a long context: resident memory at start, and KV memory as requests come and go.

    python bench/bench_memory.py                                  # the default model at 131072 positions
    python bench/bench_memory.py --waves 1,4 --base-len 32 --max-tokens 16 --out /tmp/m.json --markdown /tmp/m.md

The model's weights (default: the embedded default model; or --model DIR, any dir with a
params.json: ours or Meta's layout) are served twice by `annotated-llama serve`, one server at a
time: first as stored (the baseline), then from a temporary dir whose copied params.json sets
max_seq_len to --max-seq-len (131072; the weight files are symlinked, not copied). Reported:
  - resident memory (VmRSS of the server process) once /health answers, for both, against the
    weights' bytes: what the long context costs before any request comes;
  - then waves of 1, 4 and 16 concurrent streaming requests, request i of a wave with a prompt of
    --base-len x (i + 1) random token ids and --max-tokens new tokens (ignore_eos). During a wave
    /health is polled; the sample with the most tokens in flight (prompt plus tokens streamed so
    far, counted by the clients) is kept, and one more after the wave ends. Each sample holds
    VmRSS and every key named kv_* anywhere in /health's JSON (and the kv lines of /metrics),
    whatever the server reports: the engine of issue 16 adds its own.
A request that fails (HTTP error, error in the stream) is counted and its message kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import ROOT, Server, commit_and_time, free_port, ours_command, write_new  # noqa: E402


def long_context_copy(src: Path, dst: Path, max_seq_len: int) -> None:
    params = json.loads((src / "params.json").read_text())
    params["max_seq_len"] = max_seq_len
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "params.json" and not f.name.endswith(".py"):
            (dst / f.name).symlink_to(f.resolve())
    (dst / "params.json").write_text(json.dumps(params, indent=2))


def weights_bytes(src: Path, dtype: str | None) -> int:
    """Bytes of the weights as served: stored bytes, or numel x the --dtype's size."""
    from safetensors import safe_open
    import torch
    total = 0
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src}: no *.safetensors weights to measure (this script reads safetensors dirs)")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                size = getattr(torch, dtype).itemsize if dtype else \
                    {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1}.get(t.get_dtype(), 4)
                total += n * size
    return total


def kv_fields(obj, prefix="") -> dict:
    """Every key named kv_* in a JSON object, at any depth (dotted path -> value)."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}{k}"
            if k.lower().startswith("kv_") and not isinstance(v, (dict, list)):
                out[path] = v
            out.update(kv_fields(v, path + "."))
    return out


def sample(server: Server, in_flight: int, tokens_held: int) -> dict:
    import httpx
    try:
        h = server.health()
    except httpx.HTTPError as e:
        h = {"http_status": None, "error": f"{type(e).__name__}: {e}"}
    s = {"t": time.monotonic(), "rss_mib": server.rss_mib(), "requests_in_flight": in_flight,
         "tokens_held_client_count": tokens_held, "health_status": h.get("http_status"), "kv": kv_fields(h)}
    try:
        m = httpx.get(server.url + "/metrics", timeout=10).text
        s["metrics_kv"] = {ln.split()[0]: ln.split()[-1] for ln in m.splitlines()
                           if "kv" in ln.lower() and not ln.startswith("#") and len(ln.split()) >= 2}
    except httpx.HTTPError:
        pass
    return s


async def wave(server: Server, n: int, base_len: int, max_tokens: int, bos: int, n_words: int) -> dict:
    import httpx
    rng = random.Random(f"wave-{n}")
    prompts = [[bos] + [rng.randrange(3, n_words) for _ in range(base_len * (i + 1) - 1)] for i in range(n)]
    held = [0] * n  # tokens each request holds (its prompt once streaming starts, plus pieces so far)
    errors, done = [], [False] * n

    async def one(i, client):
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        try:
            async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    errors.append(f"HTTP {r.status_code}: {(await r.aread())[:160]!r}")
                    return
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            errors.append(f"in the stream: {str(chunk['error'])[:160]}")
                            return
                        held[i] = (held[i] or len(prompts[i])) + 1
        except httpx.HTTPError as e:
            errors.append(f"{type(e).__name__}: {e}")
        finally:
            done[i], held[i] = True, 0

    best, kv_max, rss_max = None, {}, 0.0
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=httpx.Limits(max_connections=n + 4)) as c:
        tasks = [asyncio.create_task(one(i, c)) for i in range(n)]
        while not all(done):
            await asyncio.sleep(0.25)
            s = await asyncio.to_thread(sample, server, sum(1 for h in held if h), sum(held))
            if best is None or s["tokens_held_client_count"] > best["tokens_held_client_count"]:
                best = s
            rss_max = max(rss_max, s["rss_mib"])
            for k, v in s["kv"].items():  # the largest value seen, per field (/metrics: in the JSON only)
                try:
                    kv_max[k] = max(kv_max.get(k, float("-inf")), float(v))
                except (TypeError, ValueError):
                    pass
        await asyncio.gather(*tasks)
    after = sample(server, 0, 0)
    return {"requests": n, "prompt_lens": [len(p) for p in prompts], "max_tokens": max_tokens,
            "errors": errors, "peak_in_flight": best, "kv_max_during": kv_max, "rss_max_during_mib": rss_max,
            "after": after}


def serve(label: str, model_dir: Path, a, log_dir: Path) -> Server:
    port = free_port()
    extra = (["--dtype", a.dtype] if a.dtype else []) + \
        (["--max-batch-size", str(a.max_batch_size)] if a.max_batch_size else [])
    return Server(label, ours_command(model_dir, port, *extra), port, log_dir / f"{label}.log",
                  env={"OMP_NUM_THREADS": str(a.threads)})


def fmt_kv(kv: dict, skip=()) -> str:
    """`name=value, ...` by the last part of each dotted key; `skip`: keys not worth repeating."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={int(v) if isinstance(v, float) and v.is_integer() else v}"
                     for k, v in kv.items() if k not in skip) or "(none)"


def markdown(r: dict) -> str:
    mib = r["weights_bytes"] / 2**20
    samples = [r["start"]["kv"]] + [x["kv"] for w in r["waves"] for x in (w["peak_in_flight"] or {"kv": {}}, w["after"])]
    fixed = {k for k, v in r["start"]["kv"].items() if all(x.get(k) == v for x in samples)}  # budgets, block size
    L = [f"Memory, `bench/bench_memory.py` at commit {r['commit']}, {r['date_utc']} UTC: {r['model']} "
         f"({mib:.1f} MiB of weights as served) with max_seq_len {r['max_seq_len']}, `serve` "
         f"{' '.join(r['serve_flags']) or 'with its defaults'}.", "",
         f"- resident at start: {r['start']['rss_mib']:.0f} MiB at {r['max_seq_len']} positions, "
         f"{r['baseline']['rss_mib']:.0f} MiB at the stored {r['baseline']['max_seq_len']} "
         f"(difference {r['start']['rss_mib'] - r['baseline']['rss_mib']:+.0f} MiB = "
         f"{(r['start']['rss_mib'] - r['baseline']['rss_mib']) / mib:.2f}x the weights; target: start within 10% "
         f"of the weights)", f"- KV fields at start: {fmt_kv(r['start']['kv'])}",
         f"- the table leaves out the fields that never changed ({', '.join(k.rsplit('.', 1)[-1] for k in fixed) or 'none'})", "",
         "| requests | prompt lengths | failed | most tokens in flight (client count) | RSS MiB then | kv_* then | "
         "largest kv_* during the wave | RSS MiB after | kv_* after |", "|---|---|---|---|---|---|---|---|---|"]
    for w in r["waves"]:
        p, aft = w["peak_in_flight"] or {"tokens_held_client_count": 0, "rss_mib": float("nan"), "kv": {}}, w["after"]
        lens = f"{w['prompt_lens'][0]}..{w['prompt_lens'][-1]}" if len(w["prompt_lens"]) > 1 else str(w["prompt_lens"][0])
        failed = f"{len(w['errors'])}" + (f" ({w['errors'][0][:80]})" if w["errors"] else "")
        L.append(f"| {w['requests']} | {lens} | {failed} | {p['tokens_held_client_count']} | {p['rss_mib']:.0f} | "
                 f"{fmt_kv(p['kv'], fixed)} | {fmt_kv(w['kv_max_during'], fixed)} | "
                 f"{aft['rss_mib']:.0f} | {fmt_kv(aft['kv'], fixed)} |")
    return "\n".join(L)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint dir with params.json (default: the embedded default model)")
    p.add_argument("--max-seq-len", type=int, default=131072)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="serve --dtype (default: as stored)")
    p.add_argument("--max-batch-size", type=int, help="serve --max-batch-size (default: serve's own default)")
    p.add_argument("--waves", default="1,4,16", help="concurrent requests per wave")
    p.add_argument("--base-len", type=int, default=256, help="request i of a wave: a prompt of base-len x (i + 1)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench" / "memory_results.json"))
    p.add_argument("--markdown", default=str(ROOT / "bench" / "memory_results.md"))
    p.add_argument("--force", action="store_true", help="replace existing --out / --markdown files")
    a = p.parse_args(argv)
    try:
        waves = [int(x) for x in a.waves.split(",") if x]
        if not waves or min(waves) < 1:
            raise ValueError(f"--waves: positive counts, got {a.waves!r}")
        for flag in ("max_seq_len", "base_len", "max_tokens", "threads"):
            if getattr(a, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
        if a.max_batch_size is not None and a.max_batch_size < 1:
            raise ValueError(f"--max-batch-size must be >= 1, got {a.max_batch_size}")
        if a.model:
            src = Path(a.model)
        else:
            from annotated_llama.default_model import default_model_dir
            src = default_model_dir()
        if not (src / "params.json").is_file():
            raise ValueError(f"--model {src}: no params.json (this script extends a params.json's max_seq_len)")
        if max(waves) * a.base_len + a.max_tokens > a.max_seq_len:
            raise ValueError(f"--base-len {a.base_len} x {max(waves)} + --max-tokens {a.max_tokens} exceeds "
                             f"--max-seq-len {a.max_seq_len}")
        for f in (a.out, a.markdown):
            if Path(f).exists() and not a.force:
                raise ValueError(f"{f}: already exists (pass --force to replace it, or choose --out/--markdown)")
        stored = json.loads((src / "params.json").read_text())
        wbytes = weights_bytes(src, a.dtype)
    except (ValueError, OSError) as e:
        raise SystemExit(f"bench_memory.py: error: {e}")
    from annotated_llama import Tokenizer
    tok = Tokenizer(src / "tokenizer.model")
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    commit, date = commit_and_time()
    try:
        long_dir = tmp / "long-context"
        long_context_copy(src, long_dir, a.max_seq_len)
        with serve("baseline", src, a, tmp) as s:
            time.sleep(1)
            baseline = {**sample(s, 0, 0), "max_seq_len": stored.get("max_seq_len")}
        print(f"baseline (max_seq_len {stored.get('max_seq_len')}): {baseline['rss_mib']:.0f} MiB resident; "
              f"weights {wbytes / 2**20:.1f} MiB", flush=True)
        with serve("long-context", long_dir, a, tmp) as s:
            time.sleep(1)
            start = sample(s, 0, 0)
            print(f"max_seq_len {a.max_seq_len}: {start['rss_mib']:.0f} MiB resident at start; "
                  f"kv fields: {fmt_kv(start['kv'])}", flush=True)
            results = []
            for n in waves:
                w = asyncio.run(wave(s, n, a.base_len, a.max_tokens, tok.bos_id, tok.n_words))
                results.append(w)
                pk = w["peak_in_flight"] or {}
                print(f"{n:2d} requests: {len(w['errors'])} failed{' (' + w['errors'][0] + ')' if w['errors'] else ''}; "
                      f"in flight {pk.get('tokens_held_client_count')} tokens, RSS {pk.get('rss_mib', 0):.0f} MiB, "
                      f"kv {fmt_kv(pk.get('kv', {}))}; after: RSS {w['after']['rss_mib']:.0f} MiB, "
                      f"kv {fmt_kv(w['after']['kv'])}", flush=True)
            peak = s.peak_rss_mib()
    except RuntimeError as e:
        raise SystemExit(f"bench_memory.py: error: {e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"commit": commit, "date_utc": date, "model": str(a.model or "the embedded default model"),
           "max_seq_len": a.max_seq_len, "weights_bytes": wbytes,
           "serve_flags": (["--dtype", a.dtype] if a.dtype else []) +
                          (["--max-batch-size", str(a.max_batch_size)] if a.max_batch_size else []),
           "baseline": baseline, "start": start, "waves": results, "peak_rss_mib": peak}
    text = markdown(res)
    print("\n" + text)
    write_new(Path(a.out), json.dumps(res, indent=1), force=True)
    write_new(Path(a.markdown), text + "\n", force=True)
    print(f"\nwrote {a.out} and {a.markdown}")
    return 1 if any(w["errors"] for w in results) else 0


if __name__ == "__main__":
    sys.exit(main())
