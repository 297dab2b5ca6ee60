"""`annotated-llama serve`: the OpenAI-compatible server and its chat page (server.py).

Binds 127.0.0.1 unless --host says otherwise: a model server has no authentication by default,
so exposing it to a network must be a decision (then also pass --api-key). The port is bound
first, then the model loads on a thread while the server already answers: /health says 503
"loading" until it is ready, so a supervisor sees a live process at once and a load balancer
waits for the 200. A model that fails to load stops the server with a one-line error.
With --tp N the model is split over N processes (tensor_parallel.py, tp_launch.py); rank 0
serves, and binds only after the ranks have loaded the model together (it is a relaunched
process under torchrun, so the launcher cannot hold the port for it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
import types
from datetime import timedelta
from pathlib import Path


def add_arguments(p):
    p.add_argument("--model", help="checkpoint dir or .gguf (default: the embedded default model)")
    p.add_argument("--tokenizer", help="tokenizer.model or .gguf (default: the one next to the model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize")
    p.add_argument("--template", choices=["none", "alpaca", "llama-2", "llama-3", "model"],
                   help="chat template for /v1/chat/completions (default: llama-3 for a Llama 3 vocabulary, else llama-2)")
    p.add_argument("--model-name", default=None, help="the model id reported by /v1/models (default: the path's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together at most (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot at most; beyond: 503")
    p.add_argument("--kv-budget", type=int, default=None,
                   help="cache tokens (prompt + max_tokens) reserved by running requests at most "
                        "(default: max batch size x context length)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default 1 MiB); beyond: 413")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (default: IP addresses and localhost names only, "
                        "against DNS rebinding; '*': any); repeatable")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of ORIGIN (e.g. https://app.example) call the API, with CORS headers "
                        "(default: only the server's own chat page; '*': any); repeatable")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request headers (default 10)")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request may take to send its body (default 60)")
    p.add_argument("--max-connections", type=int, default=None,
                   help="open connections at most; beyond, the longest-idle one is closed (default: half the "
                        "open-file limit, at most 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel ranks (relaunches under torchrun)")


def check_args(args):
    """One-line errors for flags that can never work, before anything is loaded or bound."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for name in ("max_batch_size", "max_queue", "max_body_bytes", "tp", "kv_budget", "max_connections"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("header_timeout", "body_timeout"):
        value = getattr(args, name)
        if not 0 < value < float("inf"):  # also refuses nan
            raise ValueError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
    if not args.host.strip():
        raise ValueError("--host is empty")


def run(args):
    check_args(args)

    path = args.model
    if path is None:
        from ..default_model import default_model_dir
        path = default_model_dir()
    if not Path(path).exists():
        raise FileNotFoundError(f"--model {path}: no such file or directory")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such file")
    if args.tp > 1:
        import torch
        return run_tensor_parallel(args, path, getattr(torch, args.dtype) if args.dtype else None)
    sock = bind(args.host, args.port)

    def load():
        import torch

        from ..core.tokenizer import Tokenizer
        from ..weights import load_model

        model, tokenizer = load_model(path, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                      device=args.device)
        if args.tokenizer:
            tokenizer = Tokenizer(args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer found next to the model; pass --tokenizer PATH")
        return model.eval(), tokenizer
    failed = []
    app = make_app(args, path, loader=load, on_load_error=failed.append)
    serve_app(app, sock, args, stop_when=lambda: bool(failed))
    if failed:
        raise ValueError(f"--model {path}: {failed[0]}")


def bind(host: str, port: int):
    """A listening socket on host:port, or a one-line OSError (port in use, unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except (OSError, OverflowError, UnicodeError) as e:
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e})") from None
    return sock


def make_app(args, path, model=None, tokenizer=None, **kw):
    from ..serving.server import create_app

    name = args.model_name or Path(str(path)).resolve().name
    hosts = list(args.allow_host)
    if args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)  # the name the server was told to listen on answers too
    return create_app(model, tokenizer, model_name=name, template=args.template, api_key=args.api_key,
                      max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
                      max_queue=args.max_queue, kv_budget=args.kv_budget, allowed_hosts=hosts,
                      allowed_origins=args.allow_origin, **kw)


def default_max_connections() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(16, min(512, soft // 2 if soft != resource.RLIM_INFINITY else 512))


def uvicorn_config(app, args, log_level: str = "info"):
    import uvicorn

    from ..serving.server_http import guarded_protocol

    protocol = guarded_protocol(header_timeout=getattr(args, "header_timeout", 10.0),
                                body_timeout=getattr(args, "body_timeout", 60.0),
                                max_connections=getattr(args, "max_connections", None) or default_max_connections())
    return uvicorn.Config(app, http=protocol, access_log=False, log_level=log_level, timeout_keep_alive=5,
                          timeout_graceful_shutdown=5)


def serve_app(app, sock, args, stop_when=None):
    """uvicorn on the bound socket until Ctrl-C, SIGTERM, or `stop_when()` turns true."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    tp = f" on {args.tp} tensor-parallel ranks" if args.tp > 1 else ""
    print(f"annotated-llama serve{tp}: http://{shown}:{port}/ (chat page), API at http://{shown}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn_config(app, args))
    if stop_when is not None:
        def watch():
            while not server.should_exit:
                if stop_when():
                    server.should_exit = True
                time.sleep(0.1)
        threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[sock])


def run_tensor_parallel(args, path, dtype):
    """`serve --tp N`: outside torchrun, check the split and relaunch this command under it (as
    `generate --tp N` does); under it, rank 0 serves while the other ranks follow its forward calls.

    The scheduler's thread makes every forward call and cache swap, so the ranks' collectives come
    from one thread, in one order. The followers wait for rank 0's next call without a deadline
    (an idle server may wait for days), so they ignore SIGINT/SIGTERM: Ctrl-C or a SIGTERM reaches
    rank 0 (sent on by the relaunching process, tp_launch.relaunch, or by torchrun), which stops
    uvicorn and then tells the followers to stop."""
    from ..parallel import tp_launch

    if "WORLD_SIZE" in os.environ and int(os.environ.get("RANK", 0)) > 0:  # a follower
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def front_end(model):  # rank 0 only
        # uvicorn stops on SIGTERM, then raises it again under the handler it found: make that
        # handler unwind (SystemExit) rather than kill the process, so the followers hear "stop".
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        app = make_app(args, path, model, tp_launch.rank0_tokenizer(model, path, args.tokenizer))
        serve_app(app, bind(args.host, args.port), args)

    return tp_launch.run_tensor_parallel(path, args.tp, front_end, device=args.device, dtype=dtype,
                                         timeout=timedelta(days=30))


@contextlib.contextmanager
def run_in_thread(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **limits):
    """A real uvicorn server for `app` on a background thread (tests, benchmarks, docs), with the
    same protocol limits as `serve` (`limits`: header_timeout, body_timeout, max_connections);
    yields its base URL. port 0: any free port."""
    import uvicorn

    config = uvicorn_config(app, types.SimpleNamespace(**limits), log_level=log_level)
    server = uvicorn.Server(config)
    sock = bind(host, port)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = sock.getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(30)
