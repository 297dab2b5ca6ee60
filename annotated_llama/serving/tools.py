"""Tool calling in Llama 3.1's JSON format: tools rendered into the prompt, the model's reply parsed
back into OpenAI `tool_calls`, and tool results rendered as `ipython` turns.

The format is Meta's (meta-llama/llama-models, models/llama3_1/prompt_format.md, "JSON based tool
calling"; the Llama 3.1 Instruct chat template on the Hugging Face hub writes the same text):
  - the system turn starts with "Environment: ipython", the knowledge cut-off and a date line;
  - the first user turn starts with an instruction to answer with a JSON function call, then
    every tool's OpenAI definition as JSON (indent 4), then the user's own text;
  - the model answers `{"name": NAME, "parameters": {...}}` (sometimes after `<|python_tag|>`)
    and ends its turn with <|eot_id|> (or <|eom_id|>, both stop ids of a Llama 3 tokenizer);
  - a tool's result comes back as a turn of role `ipython`.
The date line is fixed at the template's own default ("26 Jul 2024") rather than today's date,
so that the same request renders the same prompt on any day. Several calls in one assistant
turn are written one after another, separated by "; ", the separator vLLM's llama3_json parser
reads (Meta's 3.1 format itself shows one call per turn).

Public API (server_prompts.py uses it):
    encode_tool_dialog(tokenizer, messages, tools) -> list[int]
    parse_tool_calls(text, names) -> list[dict] | None      OpenAI tool_calls, or None for text
    ToolCallStream(names).push(text) -> str, .finish() -> (str, list | None)
"""

from __future__ import annotations

import json
import secrets
from typing import Optional

PYTHON_TAG = "<|python_tag|>"
SYSTEM_HEAD = "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
USER_HEAD = ("Given the following functions, please respond with a JSON for a function call with its proper "
             "arguments that best answers the given prompt.\n\n"
             'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
             'value}.Do not use variables.\n\n')


def _special(tokenizer, name: str) -> int:
    try:
        return tokenizer.special_id(name)
    except (KeyError, AttributeError):
        raise ValueError(f"tool calling needs a Llama 3 tokenizer (no {name} in this vocabulary)") from None


def _turn(tokenizer, role: str, text: str) -> list[int]:
    # Meta's ChatFormat.encode_message: header, "\n\n", the content, <|eot_id|>
    return ([_special(tokenizer, "<|start_header_id|>")] + tokenizer.encode(role, bos=False, eos=False)
            + [_special(tokenizer, "<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False)
            + tokenizer.encode(text, bos=False, eos=False) + [_special(tokenizer, "<|eot_id|>")])


def format_calls(calls: list[dict]) -> str:
    """An assistant turn's calls as the model writes them: {"name": ..., "parameters": {...}}."""
    return "; ".join(json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
                     for c in calls)


def encode_tool_dialog(tokenizer, messages: list[dict], tools: Optional[list[dict]]) -> list[int]:
    """Prompt ids for a dialog that uses tools, ending with an open assistant header.

    messages: {"role": "system"|"user"|"assistant"|"tool", "content": str} in order; an assistant
    message may carry "tool_calls": [{"name", "arguments": <a JSON value>}]. tools: OpenAI tool
    definitions to offer the model, or None to offer none (tool_choice "none", or a dialog that
    only has earlier calls in its history)."""
    messages = list(messages)
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    if tools:
        system = messages.pop(0)["content"].strip() if messages and messages[0]["role"] == "system" else ""
        ids += _turn(tokenizer, "system", SYSTEM_HEAD + system)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
        if first_user is None:
            raise ValueError("tools need a user message to be offered in (Llama 3.1 puts them in the first one)")
        offer = "".join(json.dumps(t, indent=4, ensure_ascii=False) + "\n\n" for t in tools)
        messages[first_user] = {"role": "user", "content": USER_HEAD + offer + messages[first_user]["content"].strip(),
                                "raw": True}
    for m in messages:
        if m.get("tool_calls"):
            ids += _turn(tokenizer, "assistant", format_calls(m["tool_calls"]))
        elif m["role"] == "tool":  # a result, as the model's code interpreter would report it
            ids += _turn(tokenizer, "ipython", m["content"])
        else:
            ids += _turn(tokenizer, m["role"], m["content"] if m.get("raw") else m["content"].strip())
    return ids + [_special(tokenizer, "<|start_header_id|>")] + tokenizer.encode("assistant", bos=False, eos=False) \
        + [_special(tokenizer, "<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False)


def parse_tool_calls(text: str, names) -> Optional[list[dict]]:
    """The reply's tool calls in OpenAI's shape ({"id", "type": "function", "function": {"name",
    "arguments": JSON text}}), or None when the reply is not (only) calls of tools in `names`:
    then it is ordinary content."""
    s = text.strip()
    if s.startswith(PYTHON_TAG):
        s = s[len(PYTHON_TAG):].lstrip()
    if not s.startswith("{"):
        return None
    decoder, calls, i = json.JSONDecoder(), [], 0
    try:
        while i < len(s):
            obj, i = decoder.raw_decode(s, i)
            if not isinstance(obj, dict) or set(obj) - {"name", "parameters", "arguments"}:
                return None
            args = obj.get("parameters", obj.get("arguments"))
            if obj.get("name") not in names or not isinstance(args, dict):
                return None
            calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                          "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
            while i < len(s) and (s[i].isspace() or s[i] == ";"):
                i += 1
    except (ValueError, RecursionError):  # not JSON (or absurdly deep): plain text
        return None
    return calls or None


class ToolCallStream:
    """Streaming with tools on: text is passed through as soon as it cannot be a tool call (it
    does not start with "{" or <|python_tag|>); a reply that may be one is held back until the
    end, then given as calls or, if it did not parse, as text (vLLM buffers the same way)."""

    def __init__(self, names):
        self.names, self.held, self.passing = set(names), "", False

    def push(self, text: str) -> str:
        if self.passing:
            return text
        self.held += text
        s = self.held.lstrip()
        if not s or s.startswith("{") or s.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(s):
            return ""  # undecided, or a call in the making
        self.passing, out, self.held = True, self.held, ""
        return out

    def finish(self) -> tuple[str, Optional[list[dict]]]:
        """(text still to send, the calls or None)."""
        if self.passing or not self.held:
            return "", None
        calls = parse_tool_calls(self.held, self.names)
        return ("", calls) if calls else (self.held, None)
