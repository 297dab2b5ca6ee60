"""The server's own cost per streamed token: `annotated-llama serve` from two source trees, A/B.

    git archive main | tar -x -C /tmp/main-tree
    python bench/server_overhead.py --tree main=/tmp/main-tree --tree new=. --rounds 5

Each tree's server (`python -m annotated_llama serve --max-batch-size 16`, that tree first on
PYTHONPATH, the embedded default model) runs as a subprocess; both are up at once but only one is
driven at a time, and the order alternates every round (A B, B A, ...), so a neighbour's load on a
shared machine falls on both about equally. Each run: C clients (asyncio + httpx), one streamed
completion each of --max-tokens greedy tokens (ignore_eos) after a random prompt; tokens/s is all
completion tokens over the wall time, TTFT each request's time to its first text. The engine alone
(Engine.step at batch 1, same backend, no HTTP) is timed once per tree as the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import drive, random_prompts  # noqa: E402
from servers import Server, free_port  # noqa: E402

ENGINE_ALONE = r"""
import json, sys, time, torch
from annotated_llama.default_model import default_model_dir
from annotated_llama.weights import load_model
from annotated_llama.inference.backends import make_runner
from annotated_llama.inference.engine import Engine
from annotated_llama.core.sampling import SamplingParams
n, rounds = int(sys.argv[1]), int(sys.argv[2])
model, tok = load_model(default_model_dir())
model.eval()
runner = make_runner(model, "compiled", max_batch_size=16)
engine = Engine(model, tok, max_batch_size=16, runner=runner)
out = []
with torch.inference_mode():
    for r in range(rounds + 1):
        engine.add([tok.bos_id] + list(range(3, 18)), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        t0, c0, count = time.perf_counter(), time.process_time(), 0
        while engine.has_work:
            count += sum(o.token is not None for o in engine.step())
        if r:  # the first is a warm-up
            out.append((count / (time.perf_counter() - t0), 1e3 * (time.process_time() - c0) / count))
print(json.dumps(out))
"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15): on a shared
    machine a neighbour slows the wall clock down far more than it changes our CPU time per token."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_alone(tree: Path, n: int, rounds: int, threads: int) -> list:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-P", "-c", ENGINE_ALONE, str(n), str(rounds)], env=env, cwd=tree,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(f"engine alone in {tree}: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def server(name: str, tree: Path, logs: Path, threads: int) -> Server:
    port = free_port()
    env = {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    # -P: the working directory does not go first on sys.path, so PYTHONPATH's tree is what is imported
    where = subprocess.run([sys.executable, "-P", "-c", "import annotated_llama; print(annotated_llama.__file__)"],
                           env={**os.environ, **env}, capture_output=True, text=True).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree):
        raise RuntimeError(f"--tree {name}={tree}: python imports annotated_llama from {where!r} instead")
    cmd = [sys.executable, "-P", "-m", "annotated_llama", "serve", "--port", str(port), "--max-batch-size", "16"]
    return Server(name, cmd, port, logs / f"{name}.log", env=env)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", required=True, metavar="NAME=DIR",
                   help="a source tree to serve from (twice: A and B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--clients", default="1,16")
    p.add_argument("--max-tokens", type=int, default=240)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the servers and the engine run")
    p.add_argument("--engine-rounds", type=int, default=3, help="engine-alone runs per tree (0: skip)")
    a = p.parse_args(argv)
    trees = {}
    for t in a.tree:
        name, _, d = t.partition("=")
        if not d or not (Path(d) / "annotated_llama").is_dir():
            p.error(f"--tree {t}: expected NAME=DIR with DIR/annotated_llama")
        trees[name] = Path(d).resolve()
    clients = [int(c) for c in a.clients.split(",")]
    from annotated_llama.core.tokenizer import Tokenizer  # noqa: F401 (the ids only need the vocabulary size)
    from annotated_llama.default_model import default_model_dir
    from annotated_llama.weights import load_model
    tok = load_model(default_model_dir())[1]
    logs = Path(tempfile.mkdtemp(prefix="server-overhead-"))
    servers = [server(n, d, logs, a.threads) for n, d in trees.items()]
    engine = {n: engine_alone(d, a.max_tokens, a.engine_rounds, a.threads) for n, d in trees.items()} if a.engine_rounds else {}
    for n, v in engine.items():
        print(f"engine alone ({n}), batch 1: {statistics.median(x[0] for x in v):.0f} tok/s, "
              f"{statistics.median(x[1] for x in v):.3f} CPU ms/token  (runs: {[round(x[0]) for x in v]} tok/s)",
              flush=True)
    runs = {s.name: {c: [] for c in clients} for s in servers}
    for s in servers:
        s.__enter__()
    try:
        for s in servers:
            state, waited = s.wait_decode_ready()
            print(f"{s.name}: decode {state} after {waited:.0f} s", flush=True)
            for c in clients:  # warm-up
                asyncio.run(drive(s.url, c, random_prompts(f"warm-{c}", c, 1, a.prompt_len, tok.bos_id,
                                                           tok.n_words), 8))
        for r in range(a.rounds):
            for c in clients:
                prompts = random_prompts(f"{r}-{c}", c, 1, a.prompt_len, tok.bos_id, tok.n_words)
                for s in (servers if r % 2 == 0 else servers[::-1]):
                    cpu = cpu_seconds(s.proc.pid)
                    res = asyncio.run(drive(s.url, c, prompts, a.max_tokens))
                    res["cpu_ms"] = 1e3 * (cpu_seconds(s.proc.pid) - cpu) / res["completion_tokens"]
                    runs[s.name][c].append(res)
                    print(f"round {r + 1}/{a.rounds} {s.name:6s} {c:2d} clients: {res['tok_s']:7.1f} tok/s, "
                          f"TTFT p50 {1e3 * statistics.median(res['ttft_s']):.1f} ms, "
                          f"server CPU {res['cpu_ms']:.3f} ms/token", flush=True)
    finally:
        for s in servers:
            s.stop()
    print(f"\nmedians over {a.rounds} rounds ({a.max_tokens} tokens, {a.prompt_len}-token prompts; "
          f"min..max of the runs in brackets)")
    for c in clients:
        for s in servers:
            tps = [x["tok_s"] for x in runs[s.name][c]]
            ttft = [1e3 * statistics.median(x["ttft_s"]) for x in runs[s.name][c]]
            cpu = [x["cpu_ms"] for x in runs[s.name][c]]
            print(f"  {c:2d} clients {s.name:6s}: {statistics.median(tps):7.1f} tok/s [{min(tps):.0f}..{max(tps):.0f}]"
                  f"  TTFT p50 {statistics.median(ttft):6.1f} ms [{min(ttft):.1f}..{max(ttft):.1f}]"
                  f"  server CPU {statistics.median(cpu):.3f} ms/token [{min(cpu):.3f}..{max(cpu):.3f}]")


if __name__ == "__main__":
    main()
