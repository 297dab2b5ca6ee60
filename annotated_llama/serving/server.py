"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared batching scheduler.

Routes (shapes as in OpenAI's API reference; /tokenize and /detokenize as vLLM's):
    GET  /                       the chat page (annotated_llama/serving/web/)
    GET  /health                 200 when serving; 503 while the model loads or after the scheduler failed
    GET  /metrics                Prometheus text (server_metrics.py)
    GET  /openapi.json           the request and response schemas (openai_schema.py, openai_responses.py)
    GET  /v1/models
    POST /v1/completions         prompt(s) -> text          (stream: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> message        (a chat template; tools in Llama 3.1's format)
    POST /tokenize, /detokenize  text or messages <-> token ids, exactly as the generation routes see them

Request bodies are read and checked by openai_schema.py (413 over `max_body_bytes`, 400 for anything
malformed or not supported, naming the field); prompts are built by server_prompts.py; generation
runs on the scheduler's thread and server_jobs.py turns its events into responses. Every failure
is OpenAI's error object {"error": {"message", "type", "param", "code"}}, answered on a connection
that stays open, and the server keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core.chat_format import TEMPLATES, default_template
from ..inference.structured_output import Grammar, response_format_grammar, tool_call_grammar
from .openai_responses import DetokenizeRequest, TokenizeRequest
from .openai_schema import APIError, ChatRequest, CompletionRequest, parse, read_json, refuse_unsupported
from .scheduler import SamplingParams, Scheduler
from .server_http import HostOriginGuard
from .server_jobs import JobSpec, Run, check_context, collect, new_shape, stream
from .server_metrics import CONTENT_TYPE, Metrics
from .server_openapi import install_openapi
from .server_prompts import chat_prompt, completion_prompts

log = logging.getLogger("annotated_llama.server")
WEB_DIR = Path(__file__).parent / "web"
ROUTES = ("/", "/health", "/metrics", "/openapi.json", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/tokenize", "/detokenize")


class Backend:
    """What the routes need once a model is there; `error` once loading or the scheduler failed."""

    def __init__(self):
        self.scheduler: Optional[Scheduler] = None
        self.template = self.tokenizer = self.n_ctx = None
        self.load_error: Optional[str] = None

    def attach(self, engine_or_model, tokenizer, template, **scheduler_kw):
        if isinstance(engine_or_model, Scheduler):
            scheduler = engine_or_model
        else:
            model = getattr(engine_or_model, "model", engine_or_model)
            tokenizer = tokenizer or getattr(engine_or_model, "tokenizer", None)
            if tokenizer is None:
                raise ValueError("create_app needs a tokenizer to serve a bare model")
            scheduler = Scheduler(model, tokenizer, **scheduler_kw)
        tok = scheduler.tokenizer
        template = template or default_template(tok)
        if template not in TEMPLATES:
            raise ValueError(f"--template: unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
        self.template, self.tokenizer, self.n_ctx = template, tok, scheduler.max_seq_len
        self.scheduler = scheduler  # last: a request that sees it sees the rest

    def ready(self) -> Scheduler:
        if self.scheduler is None:
            if self.load_error:
                raise APIError(503, f"the model failed to load: {self.load_error}", "unavailable_error",
                               code="model_load_failed")
            raise APIError(503, "the model is still loading; retry shortly", "unavailable_error",
                           code="model_loading", headers={"Retry-After": "2"})
        return self.scheduler.start()


def create_app(engine_or_model=None, tokenizer=None, *, loader: Optional[Callable] = None,
               model_name: str = "annotated-llama", template: Optional[str] = None, api_key: Optional[str] = None,
               max_body_bytes: int = 1 << 20, max_batch_size: int = 8, max_queue: int = 64,
               kv_budget: Optional[int] = None, step_delay: float = 0.0, allowed_hosts: Optional[Iterable[str]] = None,
               allowed_origins: Iterable[str] = (), on_load_error: Optional[Callable[[str], None]] = None) -> FastAPI:
    """The FastAPI app. `engine_or_model`: a `Scheduler`, a `Transformer` (with `tokenizer`), or a
    `Llama`; or instead `loader`, a function returning one of those (or a (model, tokenizer)
    pair), run on a thread at startup while the app already answers (/health: 503 "loading").
    `template`: the chat template when a request names none (default: the model's own if its
    tokenizer carries one, else llama-3 for a Llama 3 vocabulary, else llama-2). With `api_key`, /v1/* and /tokenize, /detokenize need
    `Authorization: Bearer <api_key>`. `allowed_hosts`: None serves any Host header; an iterable
    (`serve` passes --allow-host) serves IP addresses, localhost names and those. Requests from a
    browser page of another origin are refused unless it is in `allowed_origins` (then CORS
    headers are sent for it). `app.state.scheduler` is the shared scheduler once it exists."""
    scheduler_kw = dict(max_batch_size=max_batch_size, max_queue=max_queue, kv_budget=kv_budget, step_delay=step_delay)
    backend = Backend()
    if loader is None:
        backend.attach(engine_or_model, tokenizer, template, **scheduler_kw)
    metrics = Metrics(lambda: backend.scheduler.stats() if backend.scheduler is not None else None)
    created = int(time.time())

    def load():
        try:
            loaded = loader()
            pair = loaded if isinstance(loaded, tuple) else (loaded, None)
            backend.attach(*pair, template, **scheduler_kw)
            backend.scheduler.start()
            app.state.scheduler = backend.scheduler
            log.info("model loaded: %s", model_name)
        except Exception as e:  # one line for /health and the log; `serve` stops on it
            backend.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, (ValueError, OSError)) else str(e)
            log.error("loading the model failed: %s", backend.load_error)
            if on_load_error is not None:
                on_load_error(backend.load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if loader is not None:
            threading.Thread(target=load, name="annotated-llama-loader", daemon=True).start()
        else:
            backend.scheduler.start()
        yield
        if backend.scheduler is not None:
            backend.scheduler.stop()

    app = FastAPI(title="annotated-llama", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler, app.state.backend, app.state.metrics = backend.scheduler, backend, metrics
    app.add_middleware(RequestLog, metrics=metrics)
    origins = list(allowed_origins)
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts, allowed_origins=origins)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind,
                        headers=getattr(exc, "headers", None)).response()

    def check_auth(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(name: Optional[str]):
        if name is not None and name != model_name:  # vLLM's answer; OpenAI's is the same 404
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_name}` "
                                "(see /v1/models)", "not_found_error", param="model", code="model_not_found")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        if backend.scheduler is None:
            status = "error" if backend.load_error else "loading"
            return JSONResponse({"status": status, "model": model_name, "error": backend.load_error},
                                status_code=503)
        stats = backend.scheduler.stats()
        ok = stats["error"] is None
        # "decode": "compiling" while the compiled step is built in the background (requests are
        # served meanwhile, eagerly), then "compiled"; "eager" if never or the compile failed
        return JSONResponse({"status": "ok" if ok else "error", "model": model_name, "n_ctx": backend.n_ctx,
                             "template": backend.template, "decode": stats["decode"], "error": stats["error"],
                             "scheduler": stats},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response)
    async def metrics_text():
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        backend.ready()
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "annotated-llama", "max_model_len": backend.n_ctx}]}

    def sampling(req, max_tokens: int, stops=(), **extra) -> SamplingParams:
        bias = {}
        for key, value in (req.logit_bias or {}).items():  # OpenAI's keys: token ids, as strings
            if not (key.isascii() and key.isdigit()) or int(key) >= backend.tokenizer.n_words:
                raise APIError(400, f"logit_bias: {key!r} is not a token id in [0, {backend.tokenizer.n_words})",
                               param="logit_bias")
            bias[int(key)] = value
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=min(req.top_k, backend.tokenizer.n_words) if req.top_k else 0,
                repetition_penalty=req.repetition_penalty or 1.0, presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias, seed=req.seed,
                stop=tuple(req.stops()) + tuple(stops), ignore_eos=bool(req.ignore_eos), **extra)
        except ValueError as e:  # the engine's own range check (sampling.LIMITS): a 400, never a 500
            raise APIError(400, str(e), param=str(e).split()[0]) from None

    def common(request: Request, req, n: int):
        refuse_unsupported(req)
        check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if req.seed is not None and req.seed + n - 1 >= 2 ** 64:  # choice i draws from seed + i (Engine.add)
            raise APIError(400, f"seed: with {n} completions the seeds seed .. seed + {n - 1} must stay below 2**64",
                           param="seed")
        for field in ("user", "safety_identifier", "prompt_cache_key"):
            if getattr(req, field, None) is not None:  # accepted as OpenAI does: identifiers, logged
                request.state.ids = {**getattr(request.state, "ids", {}), field: getattr(req, field)}
        opts = req.stream_options
        return dict(include_usage=bool(opts and opts.include_usage), obfuscate=bool(opts and opts.include_obfuscation),
                    tokenizer=backend.tokenizer)

    async def respond(request, req, specs, shape):
        run = Run(backend.scheduler, specs, shape.chat, metrics)
        request.state.usage = (sum(len(s.ids) for s in specs), 0)
        return stream(request, run, shape) if req.stream else await collect(request, run, shape)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = parse(CompletionRequest, await read_json(request, max_body_bytes))
        n = req.n or 1
        best_of = n if req.best_of is None else req.best_of
        shape_kw = common(request, req, best_of)
        backend.ready()
        if best_of < n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
        if best_of > n and req.stream:  # as OpenAI: the best are known only at the end
            raise APIError(400, "best_of > n cannot be streamed", param="best_of")
        prompts = completion_prompts(backend.tokenizer, req.prompt)
        max_tokens = req.max_tokens or 16
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        for ids in prompts:
            check_context(backend.scheduler.engine, ids, max_tokens, chat=False)
        # best_of ranks by the logprobs even when they are not asked for; echo + logprobs: the prompt's too
        params = sampling(req, max_tokens, logprobs=req.logprobs if req.logprobs is not None else
                          (0 if best_of > n else None), prompt_logprobs=bool(req.echo) and req.logprobs is not None)
        specs = []
        for i, ids in enumerate(prompts):
            echo = "" if not req.echo else texts[i] if isinstance(texts[i], str) else backend.tokenizer.decode(ids)
            specs.append(JobSpec(ids, params, i * n, best_of, echo, keep=n if best_of > n else None))
        shape = new_shape(False, model_name, logprobs=req.logprobs is not None, **shape_kw)
        return await respond(request, req, specs, shape)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = parse(ChatRequest, await read_json(request, max_body_bytes))
        n = req.n or 1
        shape_kw = common(request, req, n)
        backend.ready()
        if req.top_logprobs and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompt = chat_prompt(backend.tokenizer, req, req.template or backend.template)
        if req.max_tokens is not None and req.max_completion_tokens is not None \
                and req.max_tokens != req.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens differ; set one", param="max_tokens")
        limit = req.max_completion_tokens or req.max_tokens
        room = min(backend.n_ctx, backend.scheduler.kv_budget) - len(prompt.ids)  # OpenAI: the rest of the context
        max_tokens = limit or max(room, 1)
        check_context(backend.scheduler.engine, prompt.ids, max_tokens, chat=True)
        grammar = await run_in_threadpool(reply_grammar, req, prompt, backend.tokenizer)
        # a chat answer also ends where the model starts a new turn by itself ("[INST]", "### Instruction:"),
        # unless a grammar decides where it ends (a JSON string may hold those words)
        params = sampling(req, max_tokens, () if grammar else prompt.stops,
                          logprobs=(req.top_logprobs or 0) if req.logprobs else None,
                          constraint=grammar.constraint if grammar else None)
        shape = new_shape(True, model_name, tool_names=prompt.tool_names,
                          parallel_tool_calls=prompt.parallel_tool_calls, logprobs=bool(req.logprobs), **shape_kw)
        return await respond(request, req, [JobSpec(prompt.ids, params, 0, n)], shape)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        check_auth(request)
        req = parse(TokenizeRequest, await read_json(request, max_body_bytes))
        check_model(req.model)
        backend.ready()
        tok = backend.tokenizer
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "send either prompt or messages", param="prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, bos=req.add_special_tokens is not False, eos=False)
        else:
            for name, wanted in (("add_generation_prompt", True), ("add_special_tokens", False)):
                if getattr(req, name) not in (None, wanted):  # the templates always work this way
                    raise APIError(400, f"{name}={not wanted} is not supported with messages: the chat template "
                                        f"adds {'the generation prompt' if wanted else 'its special tokens'} itself",
                                   param=name)
            chat = parse(ChatRequest, {"messages": [m.model_dump(exclude_none=True) for m in req.messages],
                                       **({"tools": req.tools} if req.tools else {})})
            ids = chat_prompt(tok, chat, req.template or backend.template).ids
        strs = [tok.id_to_piece(i) for i in ids] if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": backend.n_ctx, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        check_auth(request)
        req = parse(DetokenizeRequest, await read_json(request, max_body_bytes))
        check_model(req.model)
        backend.ready()
        bad = next((t for t in req.tokens if not 0 <= t < backend.tokenizer.n_words), None)
        if bad is not None:
            raise APIError(400, f"tokens: id {bad} is not in [0, {backend.tokenizer.n_words})", param="tokens")
        return {"prompt": backend.tokenizer.decode(req.tokens)}

    install_openapi(app)
    return app


def reply_grammar(req: ChatRequest, prompt, tokenizer) -> Optional[Grammar]:
    """The grammar a chat reply must follow: a forced tool call (its arguments following the
    function's parameter schema), else the response_format's JSON, else none. 400 naming the
    field for a schema that cannot be enforced."""
    try:
        if prompt.forced is not None:
            return tool_call_grammar(*prompt.forced, tokenizer)
        if req.response_format is not None:
            return response_format_grammar(req.response_format.model_dump(by_alias=True, exclude_none=True), tokenizer)
    except ValueError as e:
        param = "tools" if prompt.forced is not None else "response_format"
        raise APIError(400, f"{param}: {e}" if not str(e).startswith(param) else str(e), param=param) from None
    return None


class RequestLog:
    """ASGI middleware: one log line per request when its response ends (streams included):
    method, path, status, prompt and completion tokens, seconds, and the client's identifiers
    (`user` ...); the request counted in /metrics by route and status. An exception that escapes
    a handler becomes a 500 error object here, before the response starts, so the connection
    stays open for the client's next request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, logged = time.perf_counter(), [0], [False]
        scope.setdefault("state", {})
        path = scope["path"]
        route = path if path in ROUTES else "/web" if path.startswith("/web/") else "other"

        def line(note=""):
            if not logged[0]:
                logged[0] = True
                p, c = scope["state"].get("usage", (0, 0))
                ids = "".join(f" {k}={v!r}" for k, v in scope["state"].get("ids", {}).items())
                log.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.3fs%s%s", scope["method"], path,
                         status[0], p, c, time.perf_counter() - t0, ids, note)
                self.metrics.requests.labels(route, str(status[0])).inc()

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                line()  # before the last bytes go out: a client that has its answer finds it logged
            await send(message)
        try:
            await self.app(scope, receive, logged_send)
        except Exception as e:
            log.exception("internal error on %s %s", scope["method"], path)
            if status[0]:  # the response had started (a stream): it cannot be turned into an error now
                raise
            await APIError(500, f"internal error: {type(e).__name__}", "server_error").response()(
                scope, receive, logged_send)
        finally:
            line(" (response not completed)")
