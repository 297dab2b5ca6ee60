"""`annotated-llama serve`: the OpenAI-compatible server and its chat page (server.py).

Binds 127.0.0.1 unless --host says otherwise: a model server has no authentication by default,
so exposing it to a network must be a decision (then also pass --api-key).
With --tp N the model is split over N processes (tensor_parallel.py, tp_launch.py); rank 0 serves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time


def add_arguments(p):
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the embedded default model)")
    p.add_argument("--tokenizer", help="tokenizer.model or .gguf (default: the one next to the model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* requests")
    p.add_argument("--template", choices=["none", "alpaca", "llama-2", "llama-3", "model"],
                   help="chat template for /v1/chat/completions (default: llama-3 for a Llama 3 vocabulary, else llama-2)")
    p.add_argument("--model-name", default=None, help="the model id reported by /v1/models (default: the path's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot at most; beyond: 503")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="cache tokens (prompt + max_tokens) reserved by running requests at most "
                        "(default: max batch size x context length)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB); beyond: 413")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (relaunches under torchrun)")


def run(args):
    for name in ("port", "max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    import torch

    from ..tokenizer import Tokenizer
    from ..weights import load_model

    path = args.model
    if path is None:
        from ..default_model import default_model_dir
        path = default_model_dir()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.tp > 1:
        return run_tensor_parallel(args, path, dtype)
    model, tokenizer = load_model(path, dtype=dtype, device=args.device)
    if args.tokenizer:
        tokenizer = Tokenizer(args.tokenizer)
    if tokenizer is None:
        raise ValueError(f"{path}: no tokenizer found next to the model; pass --tokenizer PATH")
    serve_model(args, path, model.eval(), tokenizer)


def serve_model(args, path, model, tokenizer):
    """Create the app over `model` and run uvicorn until it is stopped (Ctrl-C, SIGTERM)."""
    from pathlib import Path

    import uvicorn

    from ..server import create_app

    name = args.model_name or Path(str(path)).resolve().name
    app = create_app(model, tokenizer, model_name=name, template=args.template, api_key=args.api_key,
                     max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
                     max_queue=args.max_queue, kv_budget=args.kv_budget)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tp = f" on {args.tp} tensor-parallel ranks" if args.tp > 1 else ""
    print(f"annotated-llama serve: {name}{tp} on http://{args.host}:{args.port}/ (chat page), "
          f"API at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info")


def run_tensor_parallel(args, path, dtype):
    """`serve --tp N`: outside torchrun, check the split and relaunch this command under it (as
    `generate --tp N` does); under it, rank 0 serves while the other ranks follow its forward calls.

    The scheduler's thread makes every forward call and cache swap, so the ranks' collectives come
    from one thread, in one order. The followers wait for rank 0's next call without a deadline
    (an idle server may wait for days), so they ignore SIGINT/SIGTERM: Ctrl-C or a SIGTERM reaches
    rank 0 (sent on by the relaunching process, tp_launch.relaunch, or by torchrun), which stops
    uvicorn and then tells the followers to stop."""
    import os
    import signal
    import sys
    from datetime import timedelta

    from .. import tp_launch

    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", 0)) > 0:  # a follower
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def front_end(model):  # rank 0 only
        # uvicorn stops on SIGTERM, then raises it again under the handler it found: make that
        # handler unwind (SystemExit) rather than kill the process, so the followers hear "stop".
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        serve_model(args, path, model, tp_launch.rank0_tokenizer(model, path, args.tokenizer))

    return tp_launch.run_tensor_parallel(path, args.tp, front_end, device=args.device, dtype=dtype,
                                         timeout=timedelta(days=30))


@contextlib.contextmanager
def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
    """A real uvicorn server for `app` on a background thread (tests, benchmarks, docs); yields
    its base URL. port 0: any free port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)

