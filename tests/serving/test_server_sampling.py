"""The sampling fields through the official `openai` client against a real server, each checked
against an independent reference: presence/frequency penalties and logit_bias against OpenAI's
formula applied to a full forward pass (no cache, no engine) and against the engine run directly;
chat and completions logprobs (echo included) against log_softmax of a full forward; `n` from one
shared prefill; best_of against the mean logprobs of the same seeded samples; seeds near 2**64."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
import torch

from annotated_llama import Tokenizer
from annotated_llama.cli.serve import run_in_thread
from annotated_llama.inference.engine import Engine
from annotated_llama.core.sampling import SamplingParams
from annotated_llama.serving.server import create_app
from annotated_llama.inference.streaming import decode_continuation

from fixtures import tiny_model



@pytest.fixture(scope="module")
def tok(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model(1, echo=0.05)  # it repeats what it reads: penalties show


@pytest.fixture(scope="module")
def served(model, tok):
    app = create_app(model, tok, model_name="tiny", max_batch_size=8)
    with run_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@torch.no_grad()
def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(L, V): log p(next token | ids[:i + 1]) for every position, from one forward without a cache."""
    return torch.log_softmax(model(torch.tensor([ids]), cache=False)[0].float(), dim=-1)


@torch.no_grad()
def reference_greedy(model, tok, prompt, n, presence=0.0, frequency=0.0, bias=None):
    """Greedy decoding by full recomputation with OpenAI's penalties (API reference: mu[j] -
    c[j] * frequency - (c[j] > 0) * presence, c over the tokens generated so far) and logit_bias."""
    out = []
    for _ in range(n):
        logits = model(torch.tensor([prompt + out]), cache=False)[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits = logits - counts * frequency - (counts > 0).float() * presence
        for t, b in (bias or {}).items():
            logits[t] += b
        nxt = int(logits.argmax())
        if nxt in tok.stop_ids:
            break
        out.append(nxt)
    return out


def test_penalties_and_logit_bias_equal_the_reference_and_the_engine(served, client, model, tok):
    prompt = tok.encode("the sea the sea the sea and the", bos=True, eos=False)
    plain = reference_greedy(model, tok, prompt, 12)
    bias = {plain[0]: -100.0, plain[2]: 3.0, 29889: 6.5}  # bans the token it would say first
    settings = [dict(presence_penalty=1.5, frequency_penalty=0.0), dict(presence_penalty=0.0, frequency_penalty=2.0),
                dict(presence_penalty=-0.5, frequency_penalty=0.7, logit_bias=bias)]
    wants = [reference_greedy(model, tok, prompt, 12, s["presence_penalty"], s["frequency_penalty"],
                              s.get("logit_bias")) for s in settings]
    assert all(w != plain for w in wants) and len({tuple(w) for w in wants}) == 3  # each setting matters

    def ask(s):
        body = {**s, "logit_bias": {str(t): b for t, b in s["logit_bias"].items()}} if "logit_bias" in s else s
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, **body)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one batch: each row with its own settings
        got = [r.choices[0].text for r in pool.map(ask, settings)]
    assert got == [decode_continuation(tok, prompt, w) for w in wants]
    engine = Engine(model, tok, max_batch_size=4)  # the engine itself, as tests/inference/test_engine.py checks it
    params = [SamplingParams(temperature=0, max_tokens=12, **s) for s in settings]
    with torch.inference_mode():
        assert [s.output for s in engine.run([prompt] * 3, params)] == wants


def test_logit_bias_forces_a_token_and_logprobs_stay_the_models(client, model, tok):
    prompt = tok.encode("Once upon a time", bos=True, eos=False)
    forced = tok.encode("sea", bos=False, eos=False)[-1]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                  logit_bias={str(forced): 100}, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == [tok.id_to_piece(forced).replace("\u2581", " ")] * 5
    ref = full_logprobs(model, prompt + [forced] * 5)
    # the logprob reported is the model's own (before the +100 bias), as OpenAI reports it
    assert lp.token_logprobs == pytest.approx([ref[len(prompt) - 1 + i, forced].item() for i in range(5)], abs=1e-4)
    assert all(v < -1 for v in lp.token_logprobs)


def test_chat_logprobs_equal_a_full_forward_whole_and_streamed(served, client, model, tok):
    msgs = [{"role": "user", "content": "Name a colour."}]
    ids = httpx.post(served[0] + "/tokenize", json={"messages": msgs}).json()["tokens"]
    want = reference_greedy(model, tok, ids, 8)
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert r.choices[0].logprobs.refusal is None and len(content) == len(want)
    ref = full_logprobs(model, ids + want)
    for i, (entry, t) in enumerate(zip(content, want)):
        row = ref[len(ids) - 1 + i]
        assert entry.logprob == pytest.approx(row[t].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [e.logprob for e in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
    text = bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace")
    assert text.lstrip() == r.choices[0].message.content  # the bytes spell the reply
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    off = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=0)
    assert off.choices[0].logprobs is None and off.choices[0].message.content == r.choices[0].message.content


def test_completion_echo_logprobs_equal_a_full_forward(client, model, tok):
    prompt = tok.encode("In the beginning God created", bos=True, eos=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    lp = c.logprobs
    gen = reference_greedy(model, tok, prompt, 4)
    ids = prompt + gen
    ref = full_logprobs(model, ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([ref[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
    for i in range(1, len(ids)):  # the 2 most likely and the chosen one ("up to logprobs + 1")
        top = torch.topk(ref[i - 1], 2).values.tolist()
        assert sorted(lp.top_logprobs[i].values(), reverse=True)[:2] == pytest.approx(top, abs=1e-4)
        assert lp.top_logprobs[i][lp.tokens[i]] == pytest.approx(lp.token_logprobs[i], abs=1e-6)
    assert c.text == tok.decode(prompt) + decode_continuation(tok, prompt, gen)
    starts = lp.text_offset[len(prompt):]
    assert starts[0] == len(tok.decode(prompt)) and starts == sorted(starts)
    for t, at in zip(lp.tokens[len(prompt):], starts):  # each generated token's text is where it says
        assert c.text[at:at + len(t)] == t
    assert lp.text_offset[:len(prompt)] == [len(tok.decode(prompt[:i])) for i in range(len(prompt))]
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                              logprobs=2, stream=True))
    parts = [ch.choices[0].logprobs for ch in streamed if ch.choices[0].logprobs]
    assert "".join(ch.choices[0].text for ch in streamed) == c.text
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for p in parts for v in getattr(p, field)] == getattr(lp, field), field


def test_n_shares_one_prefill_and_indexes_as_openai(served, client, tok):
    scheduler = served[1].state.scheduler
    before = dict(scheduler.stats())
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Tell me a story."}],
                                       n=4, seed=5, max_tokens=6, temperature=1.0, extra_body={"ignore_eos": True})
    after = scheduler.stats()
    assert after["prefills"] - before["prefills"] == 1  # the four forks share one prefill of the prompt
    assert after["steps"] - before["steps"] == 5  # and decode side by side: 6 tokens, the first from the prefill
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and len({c.message.content for c in r.choices}) == 4
    two = client.completions.create(model="tiny", prompt=["The sea", "A bird"], n=3, seed=9, max_tokens=4,
                                    temperature=1.0, logprobs=0, echo=True)
    assert [c.index for c in two.choices] == list(range(6))
    assert all(c.text.startswith("The sea" if c.index < 3 else "A bird") for c in two.choices)
    assert all(c.logprobs.token_logprobs[0] is None for c in two.choices)


def test_best_of_answers_the_most_likely_of_the_same_samples(client):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=21)
    every = client.completions.create(n=5, logprobs=0, **kw)
    mean = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in every.choices}
    best = client.completions.create(n=2, best_of=5, **kw)
    assert [c.text for c in best.choices] == sorted(mean, key=mean.get, reverse=True)[:2]
    assert [c.index for c in best.choices] == [0, 1] and best.choices[0].logprobs is None
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all five were generated
    same = client.completions.create(n=2, best_of=2, **kw)  # best_of == n: the n samples, in order
    assert [c.text for c in same.choices] == [c.text for c in every.choices[:2]]


def test_seeds_at_the_top_of_64_bits(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=1.0)
    a = client.chat.completions.create(seed=2 ** 64 - 1, **kw)
    assert a.choices[0].message.content == client.chat.completions.create(seed=2 ** 64 - 1, **kw).choices[0].message.content
    assert len(client.chat.completions.create(seed=2 ** 64 - 3, n=3, **kw).choices) == 3
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(seed=2 ** 64 - 2, n=3, **kw)
    assert e.value.body["param"] == "seed"
