"""The server's response bodies as pydantic models, for `/openapi.json` (clients and fuzzers read
them) and for the tests, which validate real responses against them. The handlers build plain
dicts; these models describe those dicts (OpenAI's shapes, plus vLLM's /tokenize and /detokenize).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, Field

from .openai_schema import ChatMessage, _Strict


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape (openai_logprobs.py): with echo, the prompt's first token has null."""
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ToolCallFunction(BaseModel):
    name: Optional[str] = None
    arguments: str = ""


class ToolCallOut(BaseModel):
    index: Optional[int] = None  # streamed deltas only
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str]
    tool_calls: Optional[list[ToolCallOut]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]]
    refusal: Optional[list[TokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[ToolCallOut]] = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]]


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion (text/event-stream); the last is `[DONE]`."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None
    obfuscation: Optional[str] = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Optional[str]


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    model: Optional[str] = None
    n_ctx: Optional[int] = None
    template: Optional[str] = None
    error: Optional[str] = None
    scheduler: Optional[dict] = None


# ---- vLLM's tokenizer endpoints ----------------------------------------------------------------

class TokenizeRequest(_Strict):
    """Either `prompt` (a completion prompt: BOS added unless add_special_tokens is false) or
    `messages` (rendered through the chat template, exactly as /v1/chat/completions would)."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    tools: Optional[list[dict]] = None
    template: Optional[Literal["none", "alpaca", "llama-2", "llama-3", "model"]] = None
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: Optional[bool] = None
    return_token_strs: Optional[bool] = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: Optional[list[str]] = None


class DetokenizeRequest(_Strict):
    model: Optional[str] = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


SCHEMAS: dict[str, type[BaseModel]] = {m.__name__: m for m in (
    Completion, ChatCompletion, ChatCompletionChunk, ErrorResponse, ModelList, Health, TokenizeRequest,
    TokenizeResponse, DetokenizeRequest, DetokenizeResponse)}
StreamOrCompletion = Union[Completion, ChatCompletion]
