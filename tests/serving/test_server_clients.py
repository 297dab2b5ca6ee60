"""Real client libraries against the server, as their users call them: LangChain
(`langchain-openai`: ChatOpenAI invoke, stream, batch; the completions-API OpenAI LLM's batch, which
sends a list of prompts in one request) and LiteLLM (completion, stream). Greedy answers are
compared with the official `openai` client's, so each library is shown to reach the same
generation. Everything stays on 127.0.0.1: LiteLLM reads its model price list from the copy it
ships (LITELLM_LOCAL_MODEL_COST_MAP) instead of fetching it."""

from __future__ import annotations

import functools
import operator
import os

import openai
import pytest

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.serving.server import create_app

from fixtures import tiny_model

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before litellm is imported anywhere
os.environ.setdefault("LITELLM_TELEMETRY", "False")
QUESTION = "Name three colours."


@pytest.fixture(scope="module")
def url(spm_path):
    model = tiny_model(max_seq_len=160)
    with run_in_thread(create_app(model, Tokenizer(spm_path), model_name="tiny", max_batch_size=4)) as base:
        yield base


@pytest.fixture(scope="module")
def reference(url):
    """The official client's greedy answers, and the stream's usage."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=8, temperature=0)
    texts = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in ("Once upon a time", "The sea is")]
    return {"chat": chat.choices[0].message.content, "usage": chat.usage, "completions": texts}


def test_langchain_chat_invoke_stream_batch(url, reference):
    from langchain_openai import ChatOpenAI
    llm = ChatOpenAI(model="tiny", base_url=url + "/v1", api_key="unused", temperature=0, max_tokens=8,
                     max_retries=0, stream_usage=True)  # stream_options.include_usage
    reply = llm.invoke(QUESTION)
    assert reply.content == reference["chat"]
    assert reply.usage_metadata["output_tokens"] == reference["usage"].completion_tokens
    chunks = list(llm.stream(QUESTION))
    assert "".join(c.content for c in chunks) == reference["chat"] and len(chunks) > 2
    total = functools.reduce(operator.add, chunks)  # LangChain adds the chunks' usage up
    assert total.usage_metadata["output_tokens"] == reference["usage"].completion_tokens  # counted once
    assert total.usage_metadata["input_tokens"] == reference["usage"].prompt_tokens
    batch = llm.batch([QUESTION, QUESTION])
    assert [m.content for m in batch] == [reference["chat"]] * 2


def test_langchain_completions_batch_sends_a_prompt_list(url, reference):
    from langchain_openai import OpenAI
    llm = OpenAI(model="tiny", base_url=url + "/v1", api_key="unused", temperature=0, max_tokens=6, max_retries=0,
                 batch_size=20)
    assert llm.batch(["Once upon a time", "The sea is"]) == reference["completions"]
    assert llm.invoke("The sea is") == reference["completions"][1]


def test_litellm_completion_and_stream(url, reference):
    import litellm
    kw = dict(model="openai/tiny", api_base=url + "/v1", api_key="unused", temperature=0, max_tokens=8,
              messages=[{"role": "user", "content": QUESTION}])
    r = litellm.completion(**kw)
    assert r.choices[0].message.content == reference["chat"]
    assert r.usage.completion_tokens == reference["usage"].completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in litellm.completion(**kw, stream=True)]
    assert "".join(pieces) == reference["chat"]
