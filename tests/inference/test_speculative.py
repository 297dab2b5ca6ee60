"""Speculative decoding against plain greedy decoding of the target model (exact equality)."""

import pytest
import torch

from annotated_llama.inference.speculative import speculative_generate

from fixtures import greedy_reference, tiny_model



@pytest.fixture(scope="module")
def target():
    return tiny_model(1, "tiny", n_layers=3, sharpen=8)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_plain_greedy_with_an_unrelated_draft(target, k):
    draft = tiny_model(7, "tiny", n_layers=1)
    prompt = [3, 17, 99, 4]
    ref = greedy_reference(target, prompt, 40)
    out, stats = speculative_generate(target, draft, prompt, 40, k=k)
    assert out == ref
    assert stats["proposed"] == stats["rounds"] * k
    assert 0 <= stats["acceptance_rate"] <= 1


def test_a_perfect_draft_accepts_everything_and_saves_target_calls(target):
    prompt = [5, 6, 7]
    ref = greedy_reference(target, prompt, 41)
    out, stats = speculative_generate(target, target, prompt, 41, k=4)
    assert out == ref
    assert stats["acceptance_rate"] == 1.0
    # each round emits k + 1 tokens: 1 (prefill) + 40 / 5 rounds of the target
    assert stats["target_calls"] == 1 + 8


def test_a_similar_draft_is_accepted_often(target):
    # the target with its last layer removed: a cheap draft that mostly agrees
    draft = tiny_model(1, "tiny", n_layers=2)
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if not k.startswith("layers.2.")})
    prompt = [11, 12, 13, 14]
    ref = greedy_reference(target, prompt, 30)
    out, stats = speculative_generate(target, draft, prompt, 30, k=3)
    assert out == ref
    assert stats["acceptance_rate"] > 0.2


def test_gqa_and_stop_ids(target):
    t = tiny_model(3, "tiny-gqa")
    d = tiny_model(4, "tiny-gqa", n_layers=1)
    prompt = [1, 2, 3]
    ref = greedy_reference(t, prompt, 25)
    stop = ref[10]
    first = ref.index(stop)
    out, _ = speculative_generate(t, d, prompt, 25, k=4, stop_ids=[stop])
    assert out == ref[:first]  # the engine's stop rule: a stop id ends the output, unshown


def _second_token_marginal(model, prompt, V):
    # exact distribution of the 2nd sampled token: sum over x0 of p(x0) p(x1 | x0)
    with torch.no_grad():
        p0 = torch.softmax(model(torch.tensor([prompt]), cache=False)[0, -1], -1)  # (V,)
        seqs = torch.tensor([prompt + [x] for x in range(V)])  # (V, T+1)
        p1 = torch.softmax(model(seqs, cache=False)[:, -1], -1)  # (V, V): row x0
    return p0 @ p1  # (V,)


@pytest.mark.slow  # 600 sampled generations: a few seconds on an idle CPU
def test_sampling_keeps_the_target_distribution():
    # Leviathan et al.'s acceptance rule: speculative samples are distributed as the target's
    # softmax, whatever the draft. The 2nd new token is the first one the rule decides.
    V = 8
    t = tiny_model(5, "tiny", vocab_size=V)
    d = tiny_model(6, "tiny", vocab_size=V, n_layers=1)
    with torch.no_grad():  # peaked, and different, distributions: a wrong rule would show
        t.output.weight.mul_(6)
        d.output.weight.mul_(6)
    prompt = [1, 2]
    want = _second_token_marginal(t, prompt, V)
    draft_marginal = _second_token_marginal(d, prompt, V)
    assert 0.5 * (want - draft_marginal).abs().sum() > 0.25  # the test can tell them apart
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(V)
    n = 600
    for _ in range(n):
        out, _ = speculative_generate(t, d, prompt, 2, k=2, temperature=1.0, generator=g)
        counts[out[1]] += 1
    tv = 0.5 * (counts / n - want).abs().sum()  # total variation; ~0.04 expected from noise
    assert tv < 0.1, tv


def test_bad_arguments(target):
    with pytest.raises(ValueError, match="k"):
        speculative_generate(target, target, [1], 5, k=0)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(target, target, [1], 10_000)
