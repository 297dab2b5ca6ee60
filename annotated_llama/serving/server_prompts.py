"""From a request to prompt token ids: completion prompts (a string, a list of strings, token ids,
lists of token ids) and chat messages (every OpenAI role and field checked, then rendered through
the chat template, or through Llama 3.1's tool format when tools are in play; tools.py), with the
tools a forced `tool_choice` constrains the reply to (structured_output.tool_call_grammar).

Each refusal is an APIError whose `param` is the exact field ("messages.2.tool_calls.0.function.
arguments"), as OpenAI reports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from ..core.chat_format import encode_dialog, encode_prompt, template_stops
from .openai_schema import APIError, ChatMessage, ChatRequest
from .tools import encode_tool_dialog

@dataclass
class ChatPrompt:
    ids: list[int]
    stops: tuple = ()
    tool_names: Optional[set] = None  # the tools offered: the reply is parsed for calls of these
    parallel_tool_calls: bool = True
    dialog: list = field(default_factory=list)
    forced: Optional[tuple] = None  # (tools, name or None): the reply must be a call of one of them


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """One id list per prompt: strings are encoded with BOS (Meta's text_completion); token ids are
    taken as they are, each checked against the vocabulary."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for i, p in enumerate(prompt):
        where = "prompt" if len(prompt) == 1 else f"prompt.{i}"
        if isinstance(p, str):
            out.append(encode_prompt(tokenizer, p, "none"))
            continue
        if not p:
            raise APIError(400, f"{where} is empty", param=where)
        bad = next((t for t in p if not 0 <= t < tokenizer.n_words), None)
        if bad is not None:
            raise APIError(400, f"{where}: token id {bad} is not in [0, {tokenizer.n_words})", param=where)
        out.append(list(p))
    return out


def _text(m: ChatMessage, i: int) -> Optional[str]:
    if m.content is None or isinstance(m.content, str):
        return m.content
    pieces = []
    for j, part in enumerate(m.content):
        where = f"messages.{i}.content.{j}"
        if part.prompt_cache_breakpoint is not None:
            raise APIError(400, f"{where}.prompt_cache_breakpoint is not supported: this server keeps no prompt "
                                "cache", param=f"{where}.prompt_cache_breakpoint")
        if part.type == "text" and part.text is not None:
            pieces.append(part.text)
        elif part.type == "refusal" and part.refusal is not None and m.role == "assistant":
            pieces.append(part.refusal)
        elif part.type in ("image_url", "input_audio", "file"):
            raise APIError(400, f"{where}: {part.type} content is not supported (a text-only model)",
                           param=f"{where}.type")
        else:
            raise APIError(400, f"{where}: a {part.type} part needs its {part.type!r} field"
                                + ("" if part.type == "text" or m.role == "assistant" else " (and only an "
                                   "assistant message may hold one)"), param=where)
    return "".join(pieces)


def normalize_messages(messages: list[ChatMessage]) -> list[dict]:
    """The messages as {"role", "content", "tool_calls"?, "tool_call_id"?}: developer becomes
    system, text parts are joined, tool-call arguments are parsed; anything a template cannot
    express is refused."""
    dialog, pending = [], set()  # pending: ids of calls still waiting for their tool message
    for i, m in enumerate(messages):
        at = f"messages.{i}"
        for name, why in (("name", "the chat templates have no place for a participant's name"),
                          ("audio", "this server reads text only"),
                          ("function_call", "deprecated by OpenAI: use tool_calls")):
            if getattr(m, name) is not None:
                raise APIError(400, f"{at}.{name} is not supported: {why}", param=f"{at}.{name}")
        if m.role == "function":
            raise APIError(400, f"{at}: role 'function' is deprecated by OpenAI; use role 'tool'", param=f"{at}.role")
        if m.tool_calls is not None and m.role != "assistant":
            raise APIError(400, f"{at}.tool_calls: only an assistant message may hold tool calls", param=f"{at}.tool_calls")
        if (m.tool_call_id is None) == (m.role == "tool"):
            raise APIError(400, f"{at}.tool_call_id: " + ("a tool message needs one" if m.role == "tool" else
                                                          "only a tool message may hold one"), param=f"{at}.tool_call_id")
        if m.refusal is not None and m.role != "assistant":
            raise APIError(400, f"{at}.refusal: only an assistant message may hold one", param=f"{at}.refusal")
        text = _text(m, i)
        if m.role == "assistant" and m.refusal is not None:
            text = (text or "") + m.refusal
        if text is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(400, f"{at}.content is required (it may be null only for an assistant's tool calls)",
                           param=f"{at}.content")
        if pending and m.role != "tool":
            raise APIError(400, f"{at}: the tool calls {', '.join(sorted(pending))} of an earlier assistant message "
                                "need tool messages first", param=f"{at}.role")
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text or ""}
        if m.role == "tool":
            if m.tool_call_id not in pending:
                raise APIError(400, f"{at}.tool_call_id {m.tool_call_id!r} answers no tool call of the assistant "
                                    "message before it", param=f"{at}.tool_call_id")
            pending.discard(m.tool_call_id)
        if m.tool_calls:
            calls = []
            for j, call in enumerate(m.tool_calls):
                try:
                    args = json.loads(call.function.arguments)
                except (ValueError, RecursionError):
                    raise APIError(400, f"{at}.tool_calls.{j}.function.arguments is not JSON",
                                   param=f"{at}.tool_calls.{j}.function.arguments") from None
                calls.append({"name": call.function.name, "arguments": args})
                pending.add(call.id)
            msg["tool_calls"] = calls
        dialog.append(msg)
    if pending:
        raise APIError(400, f"the tool calls {', '.join(sorted(pending))} need tool messages with their results",
                       param="messages")
    return dialog


def offered_tools(req: ChatRequest) -> tuple[Optional[list[dict]], Optional[tuple]]:
    """(the tool definitions to put in the prompt or None, the forced call or None). tool_choice:
    "none" offers none; "auto" lets the model choose; "required" forces a call of any tool, a
    named function a call of that one; allowed_tools offers only the listed tools, its mode
    "required" forcing a call of one of them."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    for i, t in enumerate(req.tools):
        if t.type != "function" or t.function is None:
            raise APIError(400, f"tools.{i}: only function tools are supported" if t.type != "function" else
                                f"tools.{i}.function is required", param=f"tools.{i}.type" if t.type != "function"
                           else f"tools.{i}.function")
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools have the same name", param="tools")
    if choice is None or choice == "auto":
        return tools, None
    if choice == "none":
        return None, None
    if choice == "required":
        return tools, (tools, None)
    if choice.type == "function":
        if choice.function is None:
            raise APIError(400, "tool_choice.function is required with type 'function'", param="tool_choice.function")
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice.function.name {choice.function.name!r} is not one of the tools",
                           param="tool_choice.function.name")
        return tools, (tools, choice.function.name)
    if choice.type == "custom" or choice.allowed_tools is None:
        raise APIError(400, "tool_choice: only function tools are supported" if choice.type == "custom" else
                            "tool_choice.allowed_tools is required with type 'allowed_tools'",
                       param="tool_choice.type" if choice.type == "custom" else "tool_choice.allowed_tools")
    allowed = []
    for i, t in enumerate(choice.allowed_tools.tools):
        at = f"tool_choice.allowed_tools.tools.{i}"
        if t.type != "function" or t.function is None or t.function.name not in names:
            raise APIError(400, f"{at}: not a function of the tools" if t.type == "function" else
                                f"{at}: only function tools are supported", param=at)
        allowed.append(tools[names.index(t.function.name)])
    return allowed, ((allowed, None) if choice.allowed_tools.mode == "required" else None)


def chat_prompt(tokenizer, req: ChatRequest, template: str) -> ChatPrompt:
    """The prompt ids of a chat request under `template`, with what the reply needs to be read."""
    dialog = normalize_messages(req.messages)
    tools, forced = offered_tools(req)
    uses_tools = tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in dialog)
    try:
        if template == "model":  # the model's own Jinja template renders tools and calls its own way
            ids = encode_dialog(tokenizer, [_hf_message(m) for m in dialog], "model", tools)
        elif uses_tools:
            if template != "llama-3":
                raise APIError(400, f"tool calling needs the llama-3 template (Llama 3.1's tool format) or the "
                                    f"model's own; this request uses {template!r}", param="tools" if tools else "messages")
            ids = encode_tool_dialog(tokenizer, dialog, tools)
        elif template == "none":  # no template: the messages' text, one after another
            ids = encode_prompt(tokenizer, "\n".join(m["content"] for m in dialog), "none")
        else:
            ids = encode_dialog(tokenizer, dialog, template)
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from None
    names = {t["function"]["name"] for t in tools} if tools else None
    return ChatPrompt(ids, template_stops(tokenizer, template), names, req.parallel_tool_calls is not False, dialog,
                      forced)


def _hf_message(m: dict) -> dict:
    # the shape transformers' chat templates read: tool calls {"type", "function": {"name",
    # "arguments": <an object>}}, results as role "tool"
    if not m.get("tool_calls"):
        return {"role": m["role"], "content": m["content"]}
    return {"role": "assistant", "content": m["content"] or None,
            "tool_calls": [{"type": "function", "function": c} for c in m["tool_calls"]]}
