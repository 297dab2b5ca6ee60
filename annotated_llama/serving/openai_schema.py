"""The OpenAI wire format of the server (server.py): request schemas, body parsing, the error object.

Every field of OpenAI's `POST /v1/completions` and `POST /v1/chat/completions` request bodies
(OpenAI's API reference, as the official `openai` Python client types them in
`types/completion_create_params.py` and `types/chat/completion_create_params.py`) is declared
here, so nothing a client sends is dropped unseen. A field is either honoured, or listed in
`UNSUPPORTED` and refused with HTTP 400 naming it whenever it asks for more than its no-op value
(`store: false` is honoured, `store: true` is refused). A field OpenAI does not define is refused
as OpenAI refuses it: "Unrecognized request argument supplied: NAME". The ranges of the sampling
settings are the engine's own (sampling.LIMITS), so the schema and the engine cannot disagree.
Extensions, as vLLM and llama.cpp's server spell them: `top_k`, `repetition_penalty`,
`ignore_eos`, and `template` (the chat template).

A body is read here, not by FastAPI: at most `limit` bytes (413 beyond), strict UTF-8 JSON
without NaN/Infinity, with no lone surrogate ("\\ud800") and no number that overflows a double
anywhere in it (400, naming where), then a pydantic model in strict mode (no "5" -> 5 or
true -> 1 coercions). Every failure is an `APIError`, which the app turns into OpenAI's error
object {"error": {"message", "type", "param", "code"}} with its status.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator
from starlette.requests import ClientDisconnect
from typing_extensions import Annotated

from ..core.sampling import LIMITS, check_range


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


Str = StrictStr


def _limited(name: str, upper: bool = True, default=None):
    """A Field with the range the engine enforces for `name` (sampling.LIMITS)."""
    low, high, closed = LIMITS[name]
    return Field(default, **{"ge" if closed else "gt": low}, **({"le": high} if upper else {}))


def _only_null(why: str):
    """For /openapi.json: a field this server refuses whenever it is set."""
    def edit(schema: dict) -> None:
        schema.clear()
        schema.update({"type": "null", "description": f"Not supported by this server: {why}."})
    return edit


# ---- message content ---------------------------------------------------------------------------

class ContentPart(_Strict):
    """One part of a message's content. Only text (and an assistant's refusal) can be read by a
    text-only model; image_url, input_audio and file parts are refused when rendered."""
    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: Optional[Str] = None
    refusal: Optional[Str] = None
    image_url: Optional[dict] = None
    input_audio: Optional[dict] = None
    file: Optional[dict] = None
    prompt_cache_breakpoint: Optional[dict] = Field(None, json_schema_extra=_only_null("no prompt cache"))


class FunctionCall(_Strict):
    name: Str
    arguments: Str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: Str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """A message of any role (developer is rendered as system). Which fields a role may carry is
    checked when the dialog is rendered (server_chat.py), so errors name the exact field."""
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[None, Str, list[ContentPart]] = None
    name: Optional[Str] = Field(None, json_schema_extra=_only_null("the chat templates have no participant names"))
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[Str] = None
    refusal: Optional[Str] = None
    audio: Optional[dict] = Field(None, json_schema_extra=_only_null("this server reads text only"))
    function_call: Optional[dict] = Field(None, json_schema_extra=_only_null("deprecated by OpenAI: use tool_calls"))


class StreamOptions(_Strict):
    include_usage: Optional[StrictBool] = None
    include_obfuscation: Optional[StrictBool] = None


# ---- tools and structured output ---------------------------------------------------------------

class FunctionDefinition(_Strict):
    name: Str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[Str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON Schema object
    strict: Optional[StrictBool] = None


class Tool(_Strict):
    type: Literal["function", "custom"]
    function: Optional[FunctionDefinition] = None
    custom: Optional[dict] = None


class NamedFunction(_Strict):
    name: Str


class AllowedTool(_Strict):
    type: Literal["function", "custom"]
    function: Optional[NamedFunction] = None
    custom: Optional[dict] = None


class AllowedTools(_Strict):
    mode: Literal["auto", "required"]
    tools: list[AllowedTool] = Field(min_length=1, max_length=128)


class ToolChoice(_Strict):
    type: Literal["function", "custom", "allowed_tools"]
    function: Optional[NamedFunction] = None
    custom: Optional[dict] = None
    allowed_tools: Optional[AllowedTools] = None


class JSONSchemaFormat(_Strict):
    name: Str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[Str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[StrictBool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


# ---- the requests --------------------------------------------------------------------------------

Bias = Annotated[float, _limited("logit_bias", default=...)]


class GenerationRequest(_Strict):
    """Fields both endpoints share (OpenAI's defaults; the ranges are the engine's)."""
    model: Optional[Str] = None
    max_tokens: Optional[StrictInt] = _limited("max_tokens", upper=False)  # beyond the context: a 400 that says so
    temperature: Optional[float] = _limited("temperature")  # None: OpenAI's default, 1
    top_p: Optional[float] = _limited("top_p")
    n: Optional[StrictInt] = Field(None, ge=1, le=128)
    stop: Union[None, Str, list[Str]] = Field(None, max_length=16)
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    seed: Optional[StrictInt] = _limited("seed")
    user: Optional[Str] = None
    presence_penalty: Optional[float] = _limited("presence_penalty")
    frequency_penalty: Optional[float] = _limited("frequency_penalty")
    logit_bias: Optional[dict[str, Bias]] = None  # {token id as a string: bias}
    # extensions (vLLM's and llama.cpp's names)
    top_k: Optional[StrictInt] = _limited("top_k")
    repetition_penalty: Optional[float] = _limited("repetition_penalty")
    ignore_eos: Optional[StrictBool] = None

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _engine_range(cls, value, info):
        if value is not None:
            check_range(info.field_name, value)  # also refuses the subnormal divisors (sampling.SMALLEST)
        return value

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        return stops


class CompletionRequest(GenerationRequest):
    prompt: Union[Str, list[Str], list[StrictInt], list[list[StrictInt]]]
    best_of: Optional[StrictInt] = Field(None, ge=1, le=20)
    echo: Optional[StrictBool] = None
    logprobs: Optional[StrictInt] = _limited("logprobs")  # OpenAI stops at 5; the engine gives up to 20
    suffix: Optional[Str] = None


class ChatRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = _limited("logprobs")
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = Field(None, max_length=128)
    tool_choice: Union[None, Literal["none", "auto", "required"], ToolChoice] = None
    parallel_tool_calls: Optional[StrictBool] = None
    functions: Optional[list[dict]] = None
    function_call: Union[None, Str, dict] = None
    audio: Optional[dict] = None
    modalities: Optional[list[Literal["text", "audio"]]] = None
    metadata: Optional[dict[str, Str]] = None
    moderation: Optional[dict] = None
    prediction: Optional[dict] = None
    prompt_cache_key: Optional[Str] = None
    prompt_cache_options: Optional[dict] = None
    prompt_cache_retention: Optional[Str] = None
    reasoning_effort: Optional[Str] = None
    safety_identifier: Optional[Str] = None
    service_tier: Optional[Str] = None
    store: Optional[StrictBool] = None
    verbosity: Optional[Str] = None
    web_search_options: Optional[dict] = None
    template: Optional[Literal["none", "alpaca", "llama-2", "llama-3", "model"]] = None  # extension


# What is not implemented, and the values that ask for nothing (which are honoured). A value
# outside them is refused with 400 naming the field. `None` (absent) is always fine.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "suffix": (("",), "insertion (fill-in-the-middle) is not supported by these models"),
    "functions": (([],), "deprecated by OpenAI: use tools"),
    "function_call": (("none",), "deprecated by OpenAI: use tool_choice"),
    "audio": ((), "this server generates text only"),
    "modalities": ((["text"],), "this server generates text only"),
    "metadata": (({},), "this server stores no completions (store: true is refused too)"),
    "store": ((False,), "this server stores no completions"),
    "moderation": ((), "this server runs no moderation model"),
    "prediction": ((), "predicted outputs (speculative drafts from the request) are not supported"),
    "prompt_cache_options": ((), "this server keeps no prompt cache"),
    "prompt_cache_retention": ((), "this server keeps no prompt cache"),
    "reasoning_effort": ((), "these models do not reason in hidden tokens"),
    "verbosity": ((), "not a setting these models have"),
    "web_search_options": ((), "this server has no web search"),
    "service_tier": (("auto", "default"), "this server has one service tier"),
}


def _document_refusals():
    """/openapi.json tells the truth about UNSUPPORTED: only the no-op values (or null) validate."""
    def extra(noop, why):
        def edit(schema: dict) -> None:
            values = [{"type": "null"}] + [{"const": v} for v in noop]
            schema.clear()
            schema.update({"anyOf": values, "description": f"Not supported by this server: {why}."})
        return edit
    for model in (CompletionRequest, ChatRequest):
        for name, (noop, why) in UNSUPPORTED.items():
            if name in model.model_fields:
                model.model_fields[name].json_schema_extra = extra(noop, why)
        model.model_rebuild(force=True)


_document_refusals()


def refuse_unsupported(req: BaseModel) -> None:
    """400 naming the first field set to something this server does not do."""
    for name, (noop, why) in UNSUPPORTED.items():
        value = getattr(req, name, None)
        if value is None:
            continue
        plain = value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else value
        if any(_same(plain, n) for n in noop):
            continue
        raise APIError(400, f"{name}={_short(plain)} is not supported: {why}", param=name, code="unsupported_parameter")


def _same(value, noop) -> bool:
    # equal and of the same kind: completions' logprobs=0 (the sampled tokens' logprobs) is not
    # chat's logprobs=false; 0 and 0.0 are the same penalty
    if isinstance(value, bool) or isinstance(noop, bool):
        return value is noop
    if isinstance(value, (int, float)) and isinstance(noop, (int, float)):
        return value == noop
    return type(value) is type(noop) and value == noop


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
    try:
        async for part in request.stream():  # also bounds bodies sent without a Content-Length
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    except ClientDisconnect:  # the client hung up (or the body read timed out) mid-body
        raise APIError(400, "the request body was not received completely") from None
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
    check_values(data)
    return data


def check_values(data) -> None:
    """400 for a string holding a lone surrogate (JSON's "\\ud800" escapes decode to one; no
    tokenizer can encode it) or a number too large for a double (1e400 parses as inf), with the
    path to it. Iterative: the JSON may be as deep as json.loads allows."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                stack.append((path + (k,), k))  # keys are strings too
                stack.append((path + (k,), v))
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise APIError(400, f"{_dotted(path) or 'body'}: the string holds a lone surrogate "
                                    f"(U+{ord(value[e.start]):04X}), which is not a character",
                               param=_dotted(path) or None) from None
        elif isinstance(value, float) and not math.isfinite(value):
            raise APIError(400, f"{_dotted(path)}: number out of range", param=_dotted(path) or None)


def _dotted(path) -> str:  # (a key may itself hold a surrogate: shown escaped)
    return ".".join(str(p) for p in path).encode("utf-8", "backslashreplace").decode("utf-8")


_MODEL_NAMES = {"ContentPart", "FunctionCall", "ToolCall", "ChatMessage", "StreamOptions", "FunctionDefinition",
                "Tool", "NamedFunction", "AllowedTool", "AllowedTools", "ToolChoice", "JSONSchemaFormat",
                "ResponseFormat"}


def parse(schema: type[BaseModel], data: dict):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        err = max(errors, key=lambda x: len(x["loc"]))  # of a union's members, the one that got furthest
        # the field's path, without pydantic's union-member tags ("prompt.str", "tool_choice.ToolChoice")
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and (
            p in ("str", "int", "float", "bool", "dict", "list") or p in _MODEL_NAMES or "[" in p)))
        if err["type"] == "extra_forbidden":  # OpenAI's own words for a field it does not know
            raise APIError(400, f"Unrecognized request argument supplied: {loc}", param=loc) from None
        msg = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]  # check_range's own words
        raise APIError(400, f"{loc}: {msg}" if loc and not msg.startswith(loc) else msg, param=loc or None) from None
    except RecursionError:
        raise APIError(400, "the request is nested too deeply") from None
