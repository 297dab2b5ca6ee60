"""Structured output and forced tool calls through the server, on random-weight models sampled at
temperature 1.0: every reply parses and validates against its schema (checked by `jsonschema`, an
independent validator), with several schemas decoding side by side in one continuous batch and an
unconstrained request among them whose text is the same as when it runs alone. Forced tool calls
(tool_choice "required", a named function, allowed_tools) give calls whose arguments validate
against the function's parameter schema, whole and streamed."""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app

from fixtures import SCHEMAS, obj, tiny_model

PER_SCHEMA = 20  # x 5 schemas: 100 replies


@pytest.fixture(scope="module")
def client(spm_path):
    model = tiny_model(max_seq_len=256)
    with run_in_thread(create_app(model, Tokenizer(spm_path), model_name="tiny", max_batch_size=16,
                                  max_queue=256)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def json_schema(name):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


ASK = [{"role": "user", "content": "Describe a person in JSON."}]


def test_every_reply_validates_with_schemas_side_by_side(client):
    def constrained(name):
        return client.chat.completions.create(model="tiny", messages=ASK, n=PER_SCHEMA, seed=7, temperature=1.0,
                                              max_tokens=200, response_format=json_schema(name))

    def plain():
        return client.chat.completions.create(model="tiny", messages=ASK, seed=3, temperature=1.0, max_tokens=60,
                                              extra_body={"ignore_eos": True}).choices[0].message.content
    alone = plain()
    with concurrent.futures.ThreadPoolExecutor(len(SCHEMAS) + 1) as pool:
        beside = pool.submit(plain)
        replies = dict(zip(SCHEMAS, pool.map(constrained, SCHEMAS)))
        assert beside.result() == alone  # an unconstrained row: unchanged by its constrained neighbours
    valid = 0
    for name, r in replies.items():
        assert len(r.choices) == PER_SCHEMA
        for choice in r.choices:
            assert choice.finish_reason == "stop", (name, choice.message.content)
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
            valid += 1
        assert len({c.message.content for c in r.choices}) > PER_SCHEMA // 2  # sampled, not one reply n times
    assert valid == PER_SCHEMA * len(SCHEMAS) == 100


def test_streamed_equals_whole_and_seeds_repeat(client):
    kw = dict(model="tiny", messages=ASK, seed=11, temperature=1.0, max_tokens=200,
              response_format=json_schema("arrays"))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert client.chat.completions.create(**kw).choices[0].message.content == whole
    jsonschema.validate(json.loads(whole), SCHEMAS["arrays"])


def test_json_object_mode(client, spm_path):
    tok = Tokenizer(spm_path)
    # a random model writes endless strings; bias it towards closing them (logit_bias and the grammar together)
    closers = {str(i): 8 for i in range(tok.n_words) if tok.id_to_piece(i) in ('"', '}', '",', '"}', '":', '▁"')}
    r = client.chat.completions.create(model="tiny", messages=ASK, n=20, seed=1, temperature=1.0, max_tokens=200,
                                       response_format={"type": "json_object"}, logit_bias=closers)
    values = [json.loads(c.message.content) for c in r.choices]
    assert all(c.finish_reason == "stop" for c in r.choices) and all(isinstance(v, dict) for v in values)
    assert any(v for v in values)  # not only {}


def test_refusals_name_the_field(client):
    for fmt, param in (({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
            "type": "object", "properties": {"a": {"type": "string"}}}}}, "response_format"),
            ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, response_format=fmt)
        assert e.value.body["param"] == param, e.value.body


# ---- forced tool calls -------------------------------------------------------------------------

WEATHER = obj({"city": {"enum": ["Paris", "Oslo", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7}})
TIME = obj({"tz": {"type": "string", "maxLength": 8}, "utc": {"type": "boolean"}})
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
         {"type": "function", "function": {"name": "noop"}}]
SCHEMA_OF = {"get_weather": WEATHER, "get_time": TIME, "noop": obj({})}  # no parameters: an empty list (OpenAI)


@pytest.fixture(scope="module")
def tools_client(llama3_tokenizer):
    model = tiny_model(dim=32, n_layers=1, n_heads=2, vocab_size=llama3_tokenizer.n_words, max_seq_len=768)
    with run_in_thread(create_app(model, llama3_tokenizer, model_name="tools", max_batch_size=16)) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "get_time", "noop"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
    ({"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
        {"type": "function", "function": {"name": "get_time"}}, {"type": "function", "function": {"name": "noop"}}]}},
     {"get_time", "noop"}),
])
def test_forced_calls_validate_against_the_parameter_schema(tools_client, choice, names):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = tools_client.chat.completions.create(model="tools", messages=ask, tools=TOOLS, tool_choice=choice, n=12,
                                             seed=4, temperature=1.0, max_tokens=120)
    seen = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None, c.message
        (call,) = c.message.tool_calls
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
        seen.add(call.function.name)
    assert len(seen) == len(names) or len(seen) >= 2  # really sampled among the tools


def test_forced_call_streamed(tools_client):
    kw = dict(model="tools", messages=[{"role": "user", "content": "Time?"}], tools=TOOLS, seed=2, temperature=1.0,
              max_tokens=120, tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = tools_client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = list(tools_client.chat.completions.create(**kw, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [("get_time", whole.function.arguments)]
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)  # never leaked as text
    jsonschema.validate(json.loads(whole.function.arguments), TIME)
