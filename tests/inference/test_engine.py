"""The engine (annotated_llama/inference/engine.py): per-row sampling settings against independent references
(HF's logits processors, OpenAI's formula), forks, cancellation, the cache budget, logprobs, and
the same seeded tokens through every front end."""

import json

import pytest
import torch
import torch.nn.functional as F

from annotated_llama import Tokenizer
from annotated_llama.core.kv_cache import ContextFull
from annotated_llama.inference.engine import Engine
from annotated_llama.core.sampling import SamplingParams

from fixtures import tiny_model

ARGS = dict(n_kv_heads=2, max_seq_len=96)


@pytest.fixture(scope="module")
def tok(spm_path):
    return Tokenizer(spm_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model(0, sharpen=4, **ARGS)


def prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 32000, (n - 1,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def processed_greedy(model, prompt, n, process):
    """Greedy decoding with no cache, `process(ids (1, L), logits (1, V)) -> logits` before each argmax."""
    ids = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([ids]), cache=False)[:, -1]
        ids.append(int(process(torch.tensor([ids]), logits).argmax()))
    return ids[len(prompt):]


def run(engine, ps, params):
    with torch.inference_mode():
        return [s.output for s in engine.run(ps, params)]


# ---- per-row settings against independent references ------------------------------------------

@pytest.fixture(scope="module")
def echoing():
    return tiny_model(1, echo=0.05, **ARGS)  # it repeats what it reads: penalties show


def test_penalties_and_logit_bias_match_references_row_by_row(echoing, tok):
    model = echoing
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor
    ps = prompts([7, 12, 5])
    n = 12
    rep = RepetitionPenaltyLogitsProcessor(3.0)
    bias = {ps[1][-1]: -100.0, ps[1][3]: 5.0, 31999: 8.0}  # bans the token it would repeat
    hf_bias = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])

    def openai(ids, logits, presence=0.8, frequency=0.6, start=None):
        # OpenAI's API reference: mu[j] - c[j] * frequency - (c[j] > 0) * presence, c over the output
        counts = torch.bincount(ids[0, start:], minlength=logits.shape[-1]).float()
        return logits - counts * frequency - (counts > 0).float() * presence

    greedy = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    settings = [greedy.replace(repetition_penalty=3.0), greedy.replace(logit_bias=bias),
                greedy.replace(presence_penalty=0.8, frequency_penalty=0.6)]
    refs = [processed_greedy(model, ps[0], n, rep), processed_greedy(model, ps[1], n, hf_bias),
            processed_greedy(model, ps[2], n, lambda ids, lg: openai(ids, lg, start=len(ps[2])))]
    plain = [processed_greedy(model, p, n, lambda ids, lg: lg) for p in ps]
    assert all(r != p for r, p in zip(refs, plain))  # every setting changes the output: the test can fail
    engine = Engine(model, tok)
    assert run(engine, ps, settings) == refs  # one batch, a different setting per row
    assert [run(engine, [p], s)[0] for p, s in zip(ps, settings)] == refs  # and each alone


def test_top_k_one_is_greedy_and_top_p_keeps_the_first_token(model, tok):
    ps = prompts([9, 4])
    engine = Engine(model, tok)
    greedy = run(engine, ps, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert run(engine, ps, SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True, seed=3)) == greedy
    assert run(engine, ps, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=10, ignore_eos=True, seed=3)) == greedy


# ---- n samples of one prompt -------------------------------------------------------------------

def test_n_samples_share_one_prefill_and_are_reproducible(model, tok):
    (p,) = prompts([20])
    params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=12, ignore_eos=True, seed=5)
    engine = Engine(model, tok)
    with torch.inference_mode():
        seqs = engine.add(p, params, n=4)
        while engine.has_work:
            engine.step()
    outs = [s.output for s in seqs]
    assert engine.prefills == 1 and len({tuple(o) for o in outs}) == 4  # four distinct samples, one prefill
    assert engine.cache.blocks_used() == 0
    # sample i is what the prompt gives alone with seed + i: the same four again
    assert [run(engine, [p], params.replace(seed=5 + i))[0] for i in range(4)] == outs


# ---- cancellation, the budget, the stop rule -----------------------------------------------------

def test_cancel_and_finish_give_the_blocks_back(model, tok):
    engine = Engine(model, tok, max_batch_size=4)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    with torch.inference_mode():
        a, b, c = (engine.add(p, params)[0] for p in prompts([10, 20, 30]))
        for _ in range(3):
            engine.step()
        held = engine.cache.blocks_used()
        engine.cancel(b)
        assert b.finish_reason == "cancelled" and engine.cache.blocks_used() < held
        assert b.id not in engine.cache.tables
        while engine.has_work:
            engine.step()
    assert a.finish_reason == c.finish_reason == "length" and len(a.output) == 30
    assert engine.cache.blocks_used() == 0 and engine.cache.tokens_held() == 0


def test_the_kv_budget_refuses_what_cannot_fit_and_queues_what_can(model, tok):
    engine = Engine(model, tok, max_batch_size=4, kv_tokens=64)
    with pytest.raises(ValueError, match="KV budget of 64"):
        engine.add(prompts([40])[0], SamplingParams(max_tokens=40))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    ps = prompts([20, 21, 22])  # each reserves 48 positions: one at a time fits 64
    with torch.inference_mode():
        seqs = [engine.add(p, params)[0] for p in ps]
        most = 0
        while engine.has_work:
            engine.step()
            most = max(most, len(engine.running))
    assert most == 1 and all(len(s.output) == 20 for s in seqs)
    assert [s.output for s in seqs] == [run(Engine(model, tok), [p], params)[0] for p in ps]


def test_the_stop_rule(model, tok):
    (p,) = prompts([8])
    engine = Engine(model, tok)
    full = run(engine, [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop_id = full[6]
    tok2 = Tokenizer(tok.path)
    tok2.stop_ids = {stop_id}
    with torch.inference_mode():
        (s,) = Engine(model, tok2).run([p], SamplingParams(temperature=0, max_tokens=20))
    assert s.output == full[:full.index(stop_id)] and s.finish_reason == "stop"  # the stop id is not output
    with torch.inference_mode():
        (s,) = Engine(model, tok2).run([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert s.output == full and s.finish_reason == "length"


# ---- log-probabilities -------------------------------------------------------------------------------

def test_logprobs_and_prompt_logprobs_equal_a_full_forward(model, tok):
    (p,) = prompts([11])
    engine = Engine(model, tok)
    with torch.inference_mode():
        (s,) = engine.run([p], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3,
                                              prompt_logprobs=True))
        lp = F.log_softmax(model(torch.tensor([p + s.output]), cache=False)[0], -1)  # (L, V)
    want = [float(lp[len(p) - 1 + i, t]) for i, t in enumerate(s.output)]
    assert max(abs(a - b) for a, b in zip(s.logprobs, want)) < 1e-4
    for i, top in enumerate(s.top_logprobs):
        assert len(top) == 3 and top[0][0] == s.output[i]  # greedy: the chosen token is the most likely
        vals, ids = torch.topk(lp[len(p) - 1 + i], 3)
        assert [t for t, _ in top] == ids.tolist() and max(abs(a - b) for (_, a), b in zip(top, vals.tolist())) < 1e-4
    assert s.prompt_logprobs[0] is None and len(s.prompt_logprobs) == len(p)
    want = [float(lp[j - 1, p[j]]) for j in range(1, len(p))]
    assert max(abs(a - b) for a, b in zip(s.prompt_logprobs[1:], want)) < 1e-4


# ---- one seeded sample, three front ends ---------------------------------------------------------

@pytest.mark.slow  # a CLI run and a server on the embedded model
def test_seeded_sampling_is_the_same_through_llama_cli_and_server(capsys):
    from fastapi.testclient import TestClient

    from annotated_llama.__main__ import main
    from annotated_llama.inference.generation import Llama
    from annotated_llama.serving.server import create_app

    llama = Llama.build(backend="eager")
    kw = dict(temperature=0.9, top_p=0.95, top_k=40, seed=7)
    ids = llama.tokenizer.encode("In the beginning", bos=True, eos=False)
    via_llama = [t for t, _ in llama.stream_tokens(ids, max_gen_len=24, ignore_eos=True, **kw) if t is not None]
    assert main(["generate", "In the beginning", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40",
                 "--seed", "7", "--max-new-tokens", "24", "--ignore-eos", "--json"]) == 0
    via_cli = json.loads(capsys.readouterr().out)["tokens"]
    with TestClient(create_app(llama)) as c:
        r = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 24, "ignore_eos": True, **kw})
    assert r.status_code == 200, r.text
    assert via_llama == via_cli and len(via_llama) == 24
    assert r.json()["choices"][0]["text"] == llama.tokenizer.decode(ids[-1:] + via_llama)[len(llama.tokenizer.decode(ids[-1:])):]


# ---- constraints (a grammar per sequence) and the range checks -------------------------------------

CHOICE = {"type": "object", "properties": {"c": {"enum": ["red", "green"]}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
          "required": ["c", "n"], "additionalProperties": False}


def test_each_fork_gets_its_own_constraint_and_neighbours_are_untouched(model, tok):
    import jsonschema

    from annotated_llama.inference.structured_output import response_format_grammar
    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "c", "schema": CHOICE}}, tok)
    made = []

    def factory():  # SamplingParams.constraint: called once per sequence
        made.append(grammar.constraint())
        return made[-1]
    ps = prompts([9, 14, 6])
    free = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=24, ignore_eos=True, seed=s) for s in (1, 2)]
    alone = Engine(model, tok, max_batch_size=8)
    with torch.inference_mode():
        want = [s.output for s in alone.run(ps[:2], free)]
        engine = Engine(model, tok, max_batch_size=8)
        rows = [engine.add(p, sp)[0] for p, sp in zip(ps[:2], free)]
        forks = engine.add(ps[2], SamplingParams(temperature=1.0, top_p=1.0, max_tokens=24, seed=3,
                                                 constraint=factory), n=4)
        while engine.has_work:
            engine.step()
    assert len(made) == 4 and len({id(c) for c in made}) == 4 and [f.constraint for f in forks] == made
    assert [r.output for r in rows] == want  # the unconstrained rows' tokens: the same with a grammar beside them
    assert (engine.steps, engine.forward_calls) == (alone.steps, alone.forward_calls)  # and no extra step
    values = [json.loads(tok.decode(f.output)) for f in forks]
    for f, v in zip(forks, values):
        assert f.finish_reason == "stop" and len(f.output) < 24
        jsonschema.validate(v, CHOICE)
    assert len({json.dumps(v) for v in values}) > 1  # the forks sample apart


@pytest.mark.parametrize("name,value,ok", [
    ("temperature", 0.0, True), ("temperature", 1e-6, True), ("temperature", 5e-324, False),
    ("temperature", 1e-7, False), ("repetition_penalty", 1e-300, False), ("repetition_penalty", 1e-6, True),
    ("repetition_penalty", 0.0, False), ("top_p", 5e-324, True), ("presence_penalty", -2.0, True),
])
def test_the_divisors_of_the_logits_refuse_subnormals(model, tok, name, value, ok):
    from annotated_llama.core.sampling import check_range
    if not ok:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**{name: value})
        return
    check_range(name, value)
    params = SamplingParams(**{"temperature": 1.0, "max_tokens": 4, "ignore_eos": True, "seed": 0, name: value})
    with torch.inference_mode():  # and what is allowed samples real tokens (no NaN reaches the draw)
        (s,) = Engine(model, tok).run(prompts([5]), params)
    assert len(s.output) == 4


def test_the_one_context_check_clamps_or_refuses(model, tok):
    # Meta's generate cuts max_tokens to the context; OpenAI's API refuses (exact=True): one rule, two policies
    engine = Engine(model, tok, max_batch_size=2)
    prompt = prompts([10])[0]
    assert engine.check(prompt, SamplingParams(max_tokens=90)) == 96 - 10
    assert engine.check(prompt, SamplingParams(max_tokens=86), exact=True) == 86
    with pytest.raises(ContextFull) as e:
        engine.check(prompt, SamplingParams(max_tokens=87), exact=True)
    assert (e.value.n_ctx, e.value.prompt_len, e.value.max_tokens) == (96, 10, 87)
    with pytest.raises(ValueError, match="no room"):
        engine.check(prompts([96])[0], SamplingParams(max_tokens=1))
