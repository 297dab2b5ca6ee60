"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) over one shared batching scheduler.

Routes (the HTTP part of CONTRACT.md; shapes as OpenAI's, see REFERENCE section 2):
    GET  /                       the chat page (annotated_llama/web/)
    GET  /health, /metrics       liveness plus the scheduler's counters (JSON; Prometheus text)
    GET  /v1/models
    POST /v1/completions         prompt -> text          (stream: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> message     (through a chat template)

Every request body is read here, not by FastAPI: at most `max_body_bytes` (413 beyond), strict
UTF-8 JSON without NaN/Infinity (400), then a pydantic model in strict mode (no "5" -> 5 or
true -> 1 coercions; unknown fields ignored, as OpenAI does). Every failure is OpenAI's error
object {"error": {"message", "type", "param", "code"}}, and the server keeps serving.
Generation runs on the scheduler's thread; a handler only waits for its job's events, and a
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
from typing import Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat_format import TEMPLATE_STOPS, TEMPLATES, encode_dialog, encode_prompt
from .scheduler import Event, QueueFull, SamplingParams, Scheduler

log = logging.getLogger("annotated_llama.server")
WEB_DIR = Path(__file__).parent / "web"


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---- request schemas (OpenAI's fields; top_k, repetition_penalty, ignore_eos, template as extensions) ----

class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: Optional[StrictStr] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's range and default
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    n: int = Field(1, ge=1, le=1)  # one choice per request: send several requests instead
    stop: Union[None, StrictStr, list[StrictStr]] = Field(None, max_length=16)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 64 - 1)  # what torch.Generator takes
    ignore_eos: bool = False
    logprobs: Union[None, bool, int] = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        return stops


class CompletionRequest(_Common):
    prompt: Union[StrictStr, list[StrictStr], list[int]]
    echo: bool = False


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    template: Optional[Literal["none", "alpaca", "llama-2", "llama-3"]] = None


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

    async def run_job(request: Request, req: _Common, ids: list[int], max_tokens: int, chat: bool, stops=()):
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


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, or an APIError: 413 over `limit` bytes, 400 for anything else."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {ctype!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    body = bytearray()
    async for part in request.stream():  # also bounds bodies sent without a Content-Length
        body += part
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    if not body:
        raise APIError(400, "the request body is empty; expected a JSON object")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = (f"{e.msg} at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError)
               else "nested too deeply" if isinstance(e, RecursionError) else str(e))
        raise APIError(400, f"invalid JSON in the request body: {why}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def parse(schema: type[BaseModel], data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # the field's path, without pydantic's union-member tags ("prompt.str" -> "prompt")
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and (
            p in ("str", "int", "float", "bool") or "[" in p or "-" in p)))
        raise APIError(400, f"{loc}: {err['msg']}" if loc else err["msg"], param=loc or None) from None
    except RecursionError:
        raise APIError(400, "the request is nested too deeply") from None


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

