"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared batching scheduler.

Routes (the HTTP part of CONTRACT.md; shapes as OpenAI's, see REFERENCE section 2):
    GET  /                       the chat page (annotated_llama/web/)
    GET  /health, /metrics       liveness plus the scheduler's counters (JSON; Prometheus text)
    GET  /v1/models
    POST /v1/completions         prompt -> text          (stream: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> message     (through a chat template)

Request bodies are read and checked by openai_schema.py (413 over `max_body_bytes`, 400 for
anything malformed); every failure becomes OpenAI's error object {"error": {"message", "type",
"param", "code"}}, and the server keeps serving. Generation runs on the scheduler's thread; a handler only waits for its job's events, and a
client that goes away cancels its job (its cache row is freed before the next decode step).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_format import TEMPLATE_STOPS, TEMPLATES, encode_dialog, encode_prompt
from .openai_schema import APIError, ChatRequest, CompletionRequest, GenerationRequest, parse, read_json
from .scheduler import Event, QueueFull, SamplingParams, Scheduler

log = logging.getLogger("annotated_llama.server")
WEB_DIR = Path(__file__).parent / "web"


# ---- the app -----------------------------------------------------------------------------------

def create_app(engine_or_model, tokenizer=None, *, model_name: str = "annotated-llama", template: Optional[str] = None,
               api_key: Optional[str] = None, max_body_bytes: int = 1 << 20, max_batch_size: int = 8,
               max_queue: int = 64, kv_budget: Optional[int] = None, step_delay: float = 0.0) -> FastAPI:
    """The FastAPI app. `engine_or_model`: a `Scheduler`, a `Transformer` (with `tokenizer`), or a
    `Llama` (its model and tokenizer). `template`: the chat template when a request names none
    (default: llama-3 for a tiktoken vocabulary, else llama-2). With `api_key`, /v1/* needs
    `Authorization: Bearer <api_key>`. `app.state.scheduler` is the shared scheduler."""
    if isinstance(engine_or_model, Scheduler):
        scheduler = engine_or_model
    else:
        model = getattr(engine_or_model, "model", engine_or_model)
        tokenizer = tokenizer or getattr(engine_or_model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("create_app needs a tokenizer to serve a bare model")
        scheduler = Scheduler(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                              kv_budget=kv_budget, step_delay=step_delay)
    tok = scheduler.tokenizer
    if template is None:
        template = "llama-3" if getattr(tok, "kind", "") == "tiktoken" else "llama-2"
    if template not in TEMPLATES:
        raise ValueError(f"--template: unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    n_ctx, created = scheduler.max_seq_len, int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="annotated-llama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(RequestLog)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _server_error(request, exc):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()

    def check_auth(request: Request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    @app.get("/health")
    async def health():
        stats = scheduler.stats()
        ok = stats["error"] is None
        return JSONResponse({"status": "ok" if ok else "error", "model": model_name, "n_ctx": n_ctx,
                             "template": template, "scheduler": stats}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        lines = [f"annotated_llama_{k} {float(v)}" for k, v in scheduler.stats().items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "annotated-llama", "max_model_len": n_ctx}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = parse(CompletionRequest, await read_json(request, max_body_bytes))
        if req.echo or req.logprobs:
            raise APIError(400, "echo and logprobs are not supported", param="echo" if req.echo else "logprobs")
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int):
            if any(not 0 <= t < tok.n_words for t in req.prompt):
                raise APIError(400, f"prompt token ids must be in [0, {tok.n_words})", param="prompt")
            ids = list(req.prompt)
        else:
            texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
            if len(texts) != 1:
                raise APIError(400, "prompt must be one string (batches: send one request per prompt)", param="prompt")
            ids = encode_prompt(tok, texts[0], "none")
        if not ids:
            raise APIError(400, "prompt is empty", param="prompt")
        return await run_job(request, req, ids, req.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = parse(ChatRequest, await read_json(request, max_body_bytes))
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        dialog = [{"role": m.role, "content": m.text()} for m in req.messages]
        chosen = req.template or template
        try:
            if chosen == "none":  # no template: the messages' text, one after another
                ids = encode_prompt(tok, "\n".join(m["content"] for m in dialog), "none")
            else:
                ids = encode_dialog(tok, dialog, chosen)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        limit = req.max_completion_tokens or req.max_tokens
        # a chat answer also ends where the model starts a new turn by itself ("[INST]", "### Instruction:")
        return await run_job(request, req, ids, limit or max(n_ctx - len(ids), 1), chat=True,
                             stops=TEMPLATE_STOPS[chosen])

    async def run_job(request: Request, req: GenerationRequest, ids: list[int], max_tokens: int, chat: bool, stops=()):
        if len(ids) + max_tokens > n_ctx:
            raise APIError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the "
                                f"{'messages' if chat else 'prompt'}, {max_tokens} in the completion). "
                                "Please reduce the length of the messages or completion.",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
                                stop=req.stops() + list(stops), ignore_eos=req.ignore_eos)
        loop, events, leading = asyncio.get_running_loop(), asyncio.Queue(), [chat]

        def emit(ev: Event):  # on the scheduler's thread: hand the event to this request's loop
            if leading[0] and ev.text:  # a chat answer starts at its first non-space (Meta strips it)
                ev.text = ev.text.lstrip()
                leading[0] = not ev.text
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
                loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            job = scheduler.start().submit(ids, params, emit)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry later", "unavailable_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except RuntimeError as e:
            raise APIError(503, str(e), "unavailable_error") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = dict(id=rid, created=int(time.time()), model=model_name)
        request.state.usage = (len(ids), 0)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream_events(request, job, events, shape, chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, final, checked, getter = [], None, time.monotonic(), None
        try:
            while final is None:
                getter = getter or asyncio.ensure_future(events.get())  # kept across waits: no event lost
                done, _ = await asyncio.wait({getter}, timeout=0.5)
                if done:
                    ev: Event = getter.result()
                    getter = None
                    pieces.append(ev.text)
                    final = ev if ev.finish_reason is not None else None
                if final is None and time.monotonic() - checked > 0.5:  # is the client still there?
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
        finally:
            if getter is not None:
                getter.cancel()
            if final is None:  # cancelled (client gone, server stopping): free the row
                scheduler.cancel(job)
        if final.finish_reason not in ("stop", "length"):
            raise APIError(500, f"generation failed: {final.error or final.finish_reason}", "server_error")
        text = "".join(pieces)
        request.state.usage = (final.prompt_tokens, final.completion_tokens)
        choice = {"index": 0, "logprobs": None, "finish_reason": final.finish_reason}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**shape, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage(final)}

    async def stream_events(request, job, events, shape, chat, include_usage):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish=None, delta=None, **extra):
            body = {"delta": delta or ({"content": text} if text or not finish else {})} if chat else {"text": text}
            choice = {"index": 0, **body, "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({**shape, "object": obj, "choices": [choice], **extra}) + "\n\n"
        done = False
        try:
            if chat:  # OpenAI's first chunk announces the role
                yield chunk("", delta={"role": "assistant", "content": ""})
            while True:
                ev: Event = await events.get()
                if ev.finish_reason is None:
                    if ev.text:  # (a chat answer's leading spaces become empty pieces)
                        yield chunk(ev.text)
                    continue
                done = True
                request.state.usage = (ev.prompt_tokens, ev.completion_tokens)
                if ev.finish_reason not in ("stop", "length"):
                    err = APIError(500, f"generation failed: {ev.error or ev.finish_reason}", "server_error")
                    yield "data: " + json.dumps({"error": {"message": err.message, "type": err.type,
                                                           "param": None, "code": None}}) + "\n\n"
                    break
                if ev.text:
                    yield chunk(ev.text)
                yield chunk("", ev.finish_reason, usage=usage(ev))
                if include_usage:
                    yield "data: " + json.dumps({**shape, "object": obj, "choices": [], "usage": usage(ev)}) + "\n\n"
                break
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            if not done:
                scheduler.cancel(job)

    return app


def usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class RequestLog:
    """ASGI middleware: one log line per request, when its response ends (streams included):
    method, path, status, prompt and completion tokens, seconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status, logged = time.perf_counter(), [0], [False]
        scope.setdefault("state", {})

        def line(note=""):
            if not logged[0]:
                logged[0] = True
                p, c = scope["state"].get("usage", (0, 0))
                log.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.3fs%s", scope["method"], scope["path"],
                         status[0], p, c, time.perf_counter() - t0, note)

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                line()
        try:
            await self.app(scope, receive, logged_send)
        finally:
            line(" (response not completed)")

