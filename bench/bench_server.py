"""Aggregate decode throughput of `annotated-llama serve` for 1, 4 and 16 concurrent clients.

Starts the real server (uvicorn on 127.0.0.1, one shared continuous-batching scheduler) on one
model, then for each client count C runs C threads, each sending `--requests` completions of
`--max-tokens` greedy tokens (ignore_eos, so every answer has the same length) through the
official `openai` client, and reports completion tokens per second of wall time, summed over
clients, and the ratio to one client. Not a test: numbers depend on the machine.

    python bench/bench_server.py                       # random weights, stories15M's shape
    python bench/bench_server.py --model DIR --clients 1,4,16 --max-tokens 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from pathlib import Path

import httpx
import openai
import torch

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.server import create_app

PROMPTS = ["Once upon a time", "The history of", "In the beginning", "My favourite food is", "The rain in Spain",
           "When I was young", "The best way to learn", "Yesterday I saw"]


def load(args):
    if args.model:
        from annotated_llama.weights import load_model
        model, tok = load_model(args.model)
        return model.eval(), tok or Tokenizer(args.tokenizer)
    torch.manual_seed(0)
    params = ModelArgs.from_name(args.preset)
    params.max_seq_len = args.max_tokens + 64
    return Transformer(params).eval(), Tokenizer(args.tokenizer)


def run_clients(url: str, n_clients: int, requests: int, max_tokens: int) -> dict:
    def client(i):
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        tokens = 0
        for r in range(requests):
            out = c.completions.create(model="bench", prompt=PROMPTS[(i + r) % len(PROMPTS)], max_tokens=max_tokens,
                                       temperature=0, extra_body={"ignore_eos": True})
            tokens += out.usage.completion_tokens
        return tokens

    before = httpx.get(url + "/health").json()["scheduler"]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
        tokens = sum(pool.map(client, range(n_clients)))
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health").json()["scheduler"]
    steps = after["steps"] - before["steps"]
    rows = after["batch_rows"] - before["batch_rows"]
    return {"clients": n_clients, "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "decode_steps": steps,
            "mean_batch": round(rows / steps, 2) if steps else 0.0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint dir (default: random weights of --preset's shape)")
    p.add_argument("--preset", default="stories15M", help="shape of the random model (default stories15M)")
    p.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "tests/data/llama-spm.model"))
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load(args)
    n_params = sum(t.numel() for t in model.parameters())
    app = create_app(model, tok, model_name="bench", max_batch_size=args.max_batch_size)
    print(f"model: {args.model or args.preset + ' (random weights)'}, {n_params / 1e6:.1f}M params, "
          f"torch threads {torch.get_num_threads()}, max batch {args.max_batch_size}", flush=True)
    results = []
    with run_in_thread(app) as url:
        run_clients(url, 1, 1, 4)  # warm-up
        for n in (int(c) for c in args.clients.split(",")):
            results.append(run_clients(url, n, args.requests, args.max_tokens))
            print(json.dumps(results[-1]), flush=True)
    base = results[0]["tokens_per_s"]
    print("\nclients  tokens/s  ratio-to-first  mean-batch")
    for r in results:
        print(f"{r['clients']:>7}  {r['tokens_per_s']:>8.1f}  {r['tokens_per_s'] / base:>14.2f}  {r['mean_batch']:>10.2f}")


if __name__ == "__main__":
    main()
