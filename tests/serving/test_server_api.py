"""Every field of OpenAI's completions and chat-completions requests, through the official `openai`
client against a real server: the schema knows each one (checked against the client's own request
types), the implemented ones do what OpenAI documents, and the rest are refused with HTTP 400
naming the field. Responses are validated against the models /openapi.json publishes."""

from __future__ import annotations

import json
import typing

import httpx
import openai
import pytest
from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.openai_responses import ChatCompletion, ChatCompletionChunk, Completion
from annotated_llama.serving.openai_schema import UNSUPPORTED, ChatRequest, CompletionRequest
from annotated_llama.serving.server import create_app

from fixtures import greedy_text, tiny_model

EXTENSIONS = {"top_k", "repetition_penalty", "ignore_eos", "template"}


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with run_in_thread(create_app(model, tokenizer, model_name="tiny", max_batch_size=8)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_the_schema_knows_every_field_of_the_openai_client():
    for ours, theirs in ((CompletionRequest, completion_create_params.CompletionCreateParamsNonStreaming),
                         (ChatRequest, chat_create_params.CompletionCreateParamsNonStreaming)):
        fields = set(typing.get_type_hints(theirs))
        assert fields <= set(ours.model_fields), fields - set(ours.model_fields)
        assert set(ours.model_fields) - fields <= EXTENSIONS  # nothing of our own but the extensions
    assert set(UNSUPPORTED) <= set(ChatRequest.model_fields) | set(CompletionRequest.model_fields)


def test_prompt_lists_and_token_ids_are_choices_in_order(client, model, tokenizer):
    prompts = ["The capital of France is", "Once upon a time", "1 2 3"]
    ids = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    want = [greedy_text(model, tokenizer, i, 6) for i in ids]
    for prompt in (prompts, ids):  # strings, then lists of token ids
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
        Completion.model_validate(r.model_dump())
        assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == want
        assert r.usage.prompt_tokens == sum(map(len, ids)) and 3 <= r.usage.completion_tokens <= 18
    one = client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, temperature=0)  # one id list
    assert one.choices[0].text == want[1]
    both = client.completions.create(model="tiny", prompt=prompts[:2], n=2, max_tokens=6, temperature=0)
    assert [(c.index, c.text) for c in both.choices] == [(0, want[0]), (1, want[0]), (2, want[1]), (3, want[1])]


def test_n_with_a_seed_gives_distinct_samples_and_the_same_on_a_rerun(client):
    msgs = [{"role": "user", "content": "Tell me something."}]
    a = client.chat.completions.create(model="tiny", messages=msgs, n=4, seed=11, max_tokens=8, temperature=1.0)
    ChatCompletion.model_validate(a.model_dump())
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3] and len(set(texts)) == 4
    b = client.chat.completions.create(model="tiny", messages=msgs, n=4, seed=11, max_tokens=8, temperature=1.0)
    assert [c.message.content for c in b.choices] == texts
    solo = client.chat.completions.create(model="tiny", messages=msgs, seed=11, max_tokens=8, temperature=1.0)
    assert solo.choices[0].message.content == texts[0]  # choice 0 of a seeded request is the n=1 answer
    assert a.usage.prompt_tokens == solo.usage.prompt_tokens  # the prompt counts once...
    assert a.usage.completion_tokens >= 4 * 1 and a.usage.completion_tokens > solo.usage.completion_tokens  # ...all 4


def test_stream_usage_exactly_once(url, client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and chunks[-1].choices == []
    assert with_usage[0].usage.model_dump() == full.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    # without include_usage, OpenAI's chunks have no usage at all (not even in the finish chunk)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**kw, "stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and not any("usage" in e for e in events)
    with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
            "prompt": "hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [e["usage"] is not None for e in events] == [False] * (len(events) - 1) + [True]


def test_obfuscation_when_asked(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True,
                                                 stream_options={"include_obfuscation": True}))
    pads = [c.model_extra.get("obfuscation") if c.model_extra else getattr(c, "obfuscation", None) for c in chunks]
    assert all(isinstance(p, str) and p for p in pads) and len(set(pads)) > 1


def test_echo_puts_the_prompt_before_the_answer(client, url):
    plain = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0)
    echoed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    streamed = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_max_completion_tokens_and_max_tokens(client):
    msgs = [{"role": "user", "content": "Count."}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=7,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=5, max_completion_tokens=6)
    assert e.value.body["param"] == "max_tokens"


def test_developer_role_is_system(client):
    base = [{"role": "user", "content": "Name a colour."}]
    dev = client.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "Be brief."}] + base,
                                         max_tokens=6, temperature=0)
    sys = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}] + base,
                                         max_tokens=6, temperature=0)
    assert dev.choices[0].message.content == sys.choices[0].message.content
    assert dev.usage.prompt_tokens == sys.usage.prompt_tokens
    parts = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}] + base)
    assert parts.choices[0].message.content == sys.choices[0].message.content  # text parts are joined


def test_user_and_identifiers_are_accepted(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="u-1", safety_identifier="s-1", prompt_cache_key="k-1")
    assert r.choices[0].message.role == "assistant"
    r = client.completions.create(model="tiny", prompt="hi", max_tokens=2, user="u-1")
    assert r.choices[0].text is not None


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REFUSED_CHAT = {
    "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "metadata": {"k": "v"}, "store": True, "moderation": {"model": "m"},
    "prediction": {"type": "content", "content": "x"}, "prompt_cache_options": {"mode": "explicit"},
    "prompt_cache_retention": "24h", "reasoning_effort": "low", "verbosity": "low",
    "web_search_options": {}, "service_tier": "flex",
}
REFUSED_COMPLETIONS = {"suffix": "the end"}


@pytest.mark.parametrize("field", sorted(REFUSED_CHAT))
def test_unimplemented_chat_fields_are_refused_by_name(client, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**CHAT, **{field: REFUSED_CHAT[field]})
    assert e.value.status_code == 400 and e.value.body["param"] == field, e.value.body
    assert field in e.value.body["message"]


@pytest.mark.parametrize("field", sorted(REFUSED_COMPLETIONS))
def test_unimplemented_completion_fields_are_refused_by_name(client, field):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, **{field: REFUSED_COMPLETIONS[field]})
    assert e.value.body["param"] == field, e.value.body


def test_refused_set_covers_the_unimplemented_fields():
    assert set(REFUSED_CHAT) | set(REFUSED_COMPLETIONS) == set(UNSUPPORTED)


# every other field of the client's request types is implemented (the tests that show it: this
# file, test_server_sampling.py, test_server_structured.py, test_server_tools.py)
IMPLEMENTED_CHAT = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                    "stream", "stream_options", "seed", "user", "safety_identifier", "prompt_cache_key",
                    "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                    "response_format", "tools", "tool_choice", "parallel_tool_calls"}
IMPLEMENTED_COMPLETIONS = {"prompt", "model", "max_tokens", "temperature", "top_p", "n", "best_of", "stop", "stream",
                           "stream_options", "seed", "user", "presence_penalty", "frequency_penalty", "logit_bias",
                           "logprobs", "echo"}


def test_every_client_field_is_implemented_or_refused():
    for theirs, implemented, refused in (
            (chat_create_params.CompletionCreateParamsNonStreaming, IMPLEMENTED_CHAT, REFUSED_CHAT),
            (completion_create_params.CompletionCreateParamsNonStreaming, IMPLEMENTED_COMPLETIONS, REFUSED_COMPLETIONS)):
        fields = set(typing.get_type_hints(theirs))
        assert implemented | set(refused) == fields and not implemented & set(refused), fields ^ (implemented | set(refused))


def test_every_implemented_field_in_one_request(client, url):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    kw = dict(model="tiny", messages=[{"role": "system", "content": "Answer in JSON."},
                                      {"role": "user", "content": "Is the sea blue?"}],
              max_completion_tokens=40, temperature=0.8, top_p=0.9, n=2, stop=["\n\n"], seed=4, user="u",
              safety_identifier="s", prompt_cache_key="k", presence_penalty=0.3, frequency_penalty=0.2,
              logit_bias={"29871": -5}, logprobs=True, top_logprobs=2, parallel_tool_calls=True,
              response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}})
    r = client.chat.completions.create(**kw)
    ChatCompletion.model_validate(r.model_dump())
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content)["ok"], bool)
        assert len(c.logprobs.content) >= 4 and all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump())
    for i in (0, 1):  # each choice streamed is the whole one
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == r.choices[i].message.content
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    c = client.completions.create(model="tiny", prompt=["Once upon", "The sea"], max_tokens=5, temperature=0.7,
                                  top_p=0.95, n=2, best_of=3, stop=["."], seed=8, user="u", presence_penalty=0.5,
                                  frequency_penalty=0.5, logit_bias={"13": -100}, logprobs=1, echo=True)
    Completion.model_validate(c.model_dump())
    assert [x.index for x in c.choices] == [0, 1, 2, 3] and c.choices[2].text.startswith("The sea")
    assert all(x.logprobs.token_logprobs[0] is None for x in c.choices)


def test_unknown_fields_are_refused_as_openai_does(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**CHAT, extra_body={"min_p": 0.1})
    assert e.value.body["message"] == "Unrecognized request argument supplied: min_p"
    assert e.value.body["param"] == "min_p"


def test_wrong_model_is_404_and_models_lists_ours(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})
    assert e.value.body["code"] == "model_not_found"
    assert [m.id for m in client.models.list().data] == ["tiny"]
