"""`/openapi.json`: the server's OpenAPI 3.1 document, built from the real pydantic models.

The handlers read their bodies themselves (openai_schema.read_json: size limit, strict JSON), so
FastAPI cannot infer the request schemas from their signatures; they are attached here, with the
response bodies of each route and the error object every route may answer with. Clients (code
generators) and fuzzers (schemathesis, in tests/serving/test_server_fuzz.py) read this document.
"""

from __future__ import annotations

from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from . import openai_responses as out
from .openai_schema import ChatRequest, CompletionRequest

REF = "#/components/schemas/{model}"
# path: (request model or None, {status: (model or None, description)})
ERRORS = {400: "a malformed or unsupported request (the field is named in `param`)",
          401: "missing or wrong API key", 403: "a Host or Origin that is not allowed", 404: "unknown model",
          413: "the body is too large", 503: "the model is loading, or the queue is full"}
ROUTES = {
    "/v1/completions": (CompletionRequest, {200: (out.Completion, "the completion; with stream: true, "
                                                  "text/event-stream of Completion chunks, then `data: [DONE]`")}),
    "/v1/chat/completions": (ChatRequest, {200: (out.ChatCompletion, "the chat completion; with stream: true, "
                                                 "text/event-stream of ChatCompletionChunk, then `data: [DONE]`")}),
    "/tokenize": (out.TokenizeRequest, {200: (out.TokenizeResponse, "the token ids")}),
    "/detokenize": (out.DetokenizeRequest, {200: (out.DetokenizeResponse, "the text")}),
    "/v1/models": (None, {200: (out.ModelList, "the served model")}),
    "/health": (None, {200: (out.Health, "serving"), 503: (out.Health, "loading, or failed")}),
}


STREAMING = ("/v1/completions", "/v1/chat/completions")


def _schema(model: type[BaseModel], components: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF, by_alias=True)
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": REF.format(model=model.__name__)}


def build(app) -> dict:
    spec = get_openapi(title=app.title, version=app.version, routes=app.routes,
                       description="An OpenAI-compatible server (annotated-llama). Unknown request fields are "
                                   "refused, as OpenAI refuses them; fields this server does not implement are "
                                   "refused with 400 naming them.")
    components = spec.setdefault("components", {}).setdefault("schemas", {})
    error_ref = _schema(out.ErrorResponse, components)
    _schema(out.ChatCompletionChunk, components)
    for path, (request, responses) in ROUTES.items():
        for method, op in spec["paths"].get(path, {}).items():
            if request is not None:
                op["requestBody"] = {"required": True,
                                     "content": {"application/json": {"schema": _schema(request, components)}}}
            op["responses"] = {str(code): {"description": text,
                                           "content": {"application/json": {"schema": _schema(model, components)}}}
                               for code, (model, text) in responses.items()}
            if path in STREAMING:  # stream: true answers server-sent events, one JSON chunk per `data:` line
                op["responses"]["200"]["content"]["text/event-stream"] = {"schema": {
                    "type": "object", "required": ["data"], "properties": {"data": {
                        "type": "string", "description": "a JSON chunk (ChatCompletionChunk or Completion), or [DONE]"}}}}
            for code, text in ERRORS.items():
                if str(code) not in op["responses"] and (request is not None or code in (401, 503)):
                    op["responses"][str(code)] = {"description": text,
                                                  "content": {"application/json": {"schema": error_ref}}}
    metrics = spec["paths"].get("/metrics", {}).get("get")
    if metrics is not None:
        metrics["responses"] = {"200": {"description": "Prometheus text exposition format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}}
    return spec


def install_openapi(app) -> None:
    def openapi():
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema
    app.openapi = openapi
