"""Tool calling, the format side: the Llama 3.1 tool prompt (compared with the text of Meta's
documented format, spelled out here by hand), replies parsed into OpenAI `tool_calls` (whole and
streamed, through the official `openai` client), tool results rendered back as `ipython` turns.

A random model never writes a tool call, so the server here runs a scripted model: a tiny
Transformer whose logits are replaced by a one-hot on the next token of a fixed script, counted
from the end of the prompt. Everything else (scheduler, streaming, parsing) is the real path."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from annotated_llama import Transformer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app
from annotated_llama.serving.tools import ToolCallStream, encode_tool_dialog, parse_tool_calls

from fixtures import tiny_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def spelled(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt written out as text, special tokens by name (an independent path to
    the ids: split at the names, encode the text between them)."""
    import re
    ids = []
    for piece in re.split(r"(<\|[a-z_]+\|>)", text):
        if re.fullmatch(r"<\|[a-z_]+\|>", piece):
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids += tokenizer.encode(piece, bos=False, eos=False)
    return ids


def test_prompt_is_meta_llama31_json_tool_format(llama3_tokenizer):
    dialog = [{"role": "system", "content": "You are helpful."}, *ASK,
              {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
              {"role": "tool", "content": '{"temperature": 21}'}]
    got = encode_tool_dialog(llama3_tokenizer, dialog, [WEATHER])
    tool_json = json.dumps(WEATHER, indent=4)
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            "Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
            "You are helpful.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n"
            "Given the following functions, please respond with a JSON for a function call with its proper arguments "
            "that best answers the given prompt.\n\nRespond in the format {\"name\": function name, \"parameters\": "
            "dictionary of argument name and its value}.Do not use variables.\n\n"
            f"{tool_json}\n\nWhat is the weather in Paris?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
            "<|start_header_id|>ipython<|end_header_id|>\n\n"
            '{"temperature": 21}<|eot_id|>'
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert got == spelled(llama3_tokenizer, want)
    # no tools offered (tool_choice "none", or only a history of calls): a plain Llama 3 dialog
    plain = encode_tool_dialog(llama3_tokenizer, ASK, None)
    assert plain == spelled(llama3_tokenizer, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                                              "What is the weather in Paris?<|eot_id|>"
                                              "<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("text,calls", [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', [("get_time", {})]),
    (' {"name": "get_time", "arguments": {}} ', [("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "get_time", "parameters": {}}',
     [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ('{"name": "launch_rockets", "parameters": {}}', None),  # not one of the tools
    ('{"name": "get_time", "parameters": {}} and then some words', None),
    ('{"name": "get_time", "parameters": "now"}', None),
    ('{"name": "get_time", "parameters": {}, "extra": 1}', None),
    ('{"name": "get_time", "parameters": {', None),  # cut off by max_tokens
    ("The weather is fine.", None),
    ("[" * 100000, None),
])
def test_parse_tool_calls(text, calls):
    got = parse_tool_calls(text, {"get_weather", "get_time"})
    if calls is None:
        assert got is None
        return
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in got)
    assert len({c["id"] for c in got}) == len(got)


def test_tool_call_stream_passes_text_and_holds_calls():
    s = ToolCallStream({"get_time"})
    assert [s.push(p) for p in [" ", "Hello", " there"]] == ["", " Hello", " there"] and s.finish() == ("", None)
    s = ToolCallStream({"get_time"})
    assert [s.push(p) for p in ["<|python", "_tag|>", '{"name": "get_time", ', '"parameters": {}}']] == [""] * 4
    rest, calls = s.finish()
    assert rest == "" and calls[0]["function"] == {"name": "get_time", "arguments": "{}"}
    s = ToolCallStream({"get_time"})
    assert s.push("{not json") == "" and s.finish() == ("{not json", None)  # held, then given as text


class Scripted(Transformer):
    """A tiny Llama 3 vocabulary model that writes `script` after a prompt of `prompt_len` tokens
    (the engine's `step` contract: logits for tokens at positions; one row per position asked for)."""

    script: list[int] = []
    prompt_len = 0

    def step(self, tokens, positions, cache=None, logits_at=None):
        logits = super().step(tokens, positions, cache, logits_at)
        at = positions if logits_at is None else positions[torch.arange(len(positions)), logits_at][:, None]  # (B, T|1)
        out = torch.full((*at.shape, logits.shape[-1]), -1e9)
        for b in range(at.shape[0]):
            for t in range(at.shape[1]):
                k = int(at[b, t]) - (self.prompt_len - 1)  # the k-th token of the reply comes next
                out[b, t, self.script[k] if 0 <= k < len(self.script) else self.eot] = 0.0
        return out if logits_at is None else out[:, 0]


@pytest.fixture(scope="module")
def served(llama3_tokenizer):
    from annotated_llama.serving.scheduler import Scheduler
    model = tiny_model(dim=32, n_layers=1, n_heads=2, vocab_size=llama3_tokenizer.n_words, max_seq_len=512, cls=Scripted)
    model.eot = llama3_tokenizer.special_id("<|eot_id|>")
    scheduler = Scheduler(model, llama3_tokenizer, max_batch_size=2, backend="eager")  # step as written, not compiled
    with run_in_thread(create_app(scheduler, model_name="tools")) as url:
        yield url, model


def say(served, tokenizer, reply: str, body: dict):
    """Script the model to answer `reply` to this request's prompt."""
    url, model = served
    model.prompt_len = httpx.post(url + "/tokenize", json={k: body[k] for k in ("messages", "tools") if k in body}
                                  ).json()["count"]
    model.script = spelled(tokenizer, reply)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_a_tool_call_whole_and_streamed(served, client, llama3_tokenizer):
    body = {"messages": ASK, "tools": [WEATHER, TIME]}
    say(served, llama3_tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}', body)
    r = client.chat.completions.create(model="tools", max_tokens=40, temperature=0, **body)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    chunks = list(client.chat.completions.create(model="tools", max_tokens=40, temperature=0, stream=True, **body))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and not any(d.content for d in deltas)  # the call is never leaked as text
    streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id.startswith("call_")
    assert streamed[0].function.name == "get_weather" and json.loads(streamed[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_plain_text_with_tools_streams_at_once(served, client, llama3_tokenizer):
    body = {"messages": ASK, "tools": [WEATHER]}
    say(served, llama3_tokenizer, "It is sunny in Paris today.", body)
    r = client.chat.completions.create(model="tools", max_tokens=40, temperature=0, **body)
    assert r.choices[0].message.content == "It is sunny in Paris today." and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tools", max_tokens=40, temperature=0, stream=True, **body))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == r.choices[0].message.content and len(texts) > 3  # streamed, not held back


def test_parallel_calls_and_parallel_tool_calls_false(served, client, llama3_tokenizer):
    body = {"messages": ASK, "tools": [WEATHER, TIME]}
    say(served, llama3_tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                                  '{"name": "get_time", "parameters": {}}', body)
    r = client.chat.completions.create(model="tools", max_tokens=60, temperature=0, **body)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather", "get_time"]
    r = client.chat.completions.create(model="tools", max_tokens=60, temperature=0, parallel_tool_calls=False, **body)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]


def test_tool_results_round_trip(served, client, llama3_tokenizer):
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temperature": 21}'}]
    body = {"messages": history, "tools": [WEATHER]}
    say(served, llama3_tokenizer, "It is 21 degrees in Paris.", body)
    r = client.chat.completions.create(model="tools", max_tokens=40, temperature=0, **body)
    assert r.choices[0].message.content == "It is 21 degrees in Paris."
    ids = httpx.post(served[0] + "/tokenize", json=body).json()["tokens"]
    text = llama3_tokenizer.decode(ids)
    assert text.endswith('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
                         '{"city": "Paris"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>\n\n'
                         '{"temperature": 21}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n')


def test_tool_choice_none_offers_no_tools(served, client, llama3_tokenizer):
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "none"}
    say(served, llama3_tokenizer, '{"name": "get_weather", "parameters": {"city": "Paris"}}', {"messages": ASK})
    r = client.chat.completions.create(model="tools", max_tokens=40, temperature=0, **body)
    plain = client.chat.completions.create(model="tools", max_tokens=1, temperature=0, messages=ASK)
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens  # the tools are not in the prompt...
    assert r.choices[0].message.tool_calls is None  # ...and the reply is not read as a call
    assert r.choices[0].message.content.startswith('{"name"')


@pytest.mark.parametrize("body,param", [
    ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice.function.name"),
    ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": {"type": "custom", "custom": {"name": "x"}}}, "tool_choice.type"),
    ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [
        {"type": "function", "function": {"name": "nope"}}]}}}, "tool_choice.allowed_tools.tools.0"),
    ({"tool_choice": {"type": "allowed_tools"}}, "tool_choice.allowed_tools"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "strict": True,
                                                                             "parameters": {"type": "object"}}}]},
     "tools"),  # strict needs additionalProperties: false
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"template": "llama-2"}, "tools"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"}]}, "messages.1.tool_calls.0.function.arguments"),
    ({"messages": ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "user", "content": "and?"}]}, "messages.2.role"),
    ({"messages": ASK + [{"role": "assistant", "content": None}]}, "messages.1.content"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]}, "messages.0.name"),
])
def test_tool_requests_refused_by_field(served, body, param):
    r = httpx.post(served[0] + "/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 2,
                                                             **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.json()
