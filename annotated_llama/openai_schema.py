"""The OpenAI wire format of the server (server.py): request schemas, body parsing, the error object.

A request body is read here, not by FastAPI: at most `limit` bytes (413 beyond), strict UTF-8
JSON without NaN/Infinity (400), then a pydantic model in strict mode (no "5" -> 5 or true -> 1
coercions; unknown fields ignored, as OpenAI does). Every failure is an `APIError`, which the app
turns into OpenAI's error object {"error": {"message", "type", "param", "code"}} with its status.
Field names and ranges are OpenAI's (REFERENCE section 2); top_k, repetition_penalty,
ignore_eos and template are extensions.
"""

from __future__ import annotations

import json
from typing import Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError


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


class GenerationRequest(_Strict):
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


class CompletionRequest(GenerationRequest):
    prompt: Union[StrictStr, list[StrictStr], list[int]]
    echo: bool = False


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    template: Optional[Literal["none", "alpaca", "llama-2", "llama-3"]] = None


# ---- reading a request -------------------------------------------------------------------------

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
