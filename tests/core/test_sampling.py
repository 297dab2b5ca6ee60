"""Sampling as pure functions: against Meta's sample_top_p (written out literally here), HF's
logits processors, and hand-made distributions."""

import pytest
import torch

from annotated_llama.core.sampling import (apply_repetition_penalty, apply_top_k, check_sampling_args, greedy,
                                      logits_to_probs, make_generator, sample, sample_top_p, token_presence,
                                      top_p_mask)


def meta_sample_top_p(probs, p, generator):
    # meta-llama/llama generation.py's sample_top_p, retyped
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def test_top_p_keeps_the_token_that_crosses_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 2), 0.05 (id 0)
    sorted_probs = probs.sort(descending=True).values
    assert top_p_mask(sorted_probs, 0.7).tolist() == [[False, False, True, True]]  # keeps ids 1, 3
    assert top_p_mask(sorted_probs, 0.9).tolist() == [[False, False, False, True]]  # 0.8 < 0.9: id 2 too
    assert top_p_mask(sorted_probs, 0.3).tolist() == [[False, True, True, True]]  # the first always stays
    assert top_p_mask(sorted_probs, 1.0).tolist() == [[False] * 4]
    drawn = {int(sample_top_p(probs, 0.7, make_generator(s))) for s in range(200)}
    assert drawn == {1, 3}


def test_top_p_per_row_settings():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 2)
    g = make_generator(0)
    seen = [set(), set()]
    for _ in range(300):
        t = sample_top_p(probs, torch.tensor([0.4, 0.7]), g)
        seen[0].add(int(t[0]))
        seen[1].add(int(t[1]))
    assert seen == [{1}, {1, 3}]


def test_sample_top_p_equals_metas_code_draw_for_draw():
    probs = torch.softmax(torch.randn(4, 50) * 3, dim=-1)
    for seed in range(20):
        ours = sample_top_p(probs, 0.9, make_generator(seed))
        theirs = meta_sample_top_p(probs.clone(), 0.9, make_generator(seed))[:, 0]
        assert torch.equal(ours, theirs)


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]] * 2
    out = apply_top_k(logits, torch.tensor([1, 3]))
    assert torch.isfinite(out).tolist() == [[False, True, False, False, False], [False, True, True, True, False]]
    assert torch.equal(apply_top_k(logits, None), logits) and torch.equal(apply_top_k(logits, 0), logits)
    assert torch.isfinite(apply_top_k(logits, 99)).all()  # k > V: no limit


def test_top_k_matches_hf_warper():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(3, 40)
    hf = transformers.TopKLogitsWarper(top_k=7)(torch.zeros(3, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isfinite(hf), torch.isfinite(apply_top_k(logits, 7)))


def test_repetition_penalty_matches_hf():
    transformers = pytest.importorskip("transformers")
    logits = torch.randn(2, 30)
    ids = torch.tensor([[3, 3, 7, 12], [0, 29, 5, 5]])
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    got = apply_repetition_penalty(logits, token_presence(ids, 30), 1.3)
    torch.testing.assert_close(got, expected)
    # padding (-1) in ragged histories is ignored, and per-row penalties work
    padded = torch.tensor([[-1, -1, 3, 7], [0, 29, 5, 5]])
    got = apply_repetition_penalty(logits, token_presence(padded, 30), torch.tensor([1.0, 1.3]))
    torch.testing.assert_close(got[0], logits[0])
    torch.testing.assert_close(got[1], expected[1])


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(3, 100)
    a = [sample(logits, 1.0, 0.95, generator=make_generator(42)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)
    g1, g2 = make_generator(7), make_generator(7)
    run1 = torch.stack([sample(logits, 0.8, 0.9, 20, generator=g1) for _ in range(30)])
    run2 = torch.stack([sample(logits, 0.8, 0.9, 20, generator=g2) for _ in range(30)])
    assert torch.equal(run1, run2)
    g3 = make_generator(8)
    run3 = torch.stack([sample(logits, 0.8, 0.9, 20, generator=g3) for _ in range(30)])
    assert not torch.equal(run1, run3)


def test_per_row_generators_make_rows_independent_of_the_batch():
    logits = torch.randn(3, 100)
    alone = [sample(logits[1:2], 1.0, 1.0, generator=[make_generator(5)]) for _ in range(1)][0]
    batch = sample(logits, 1.0, 1.0, generator=[make_generator(1), make_generator(5), make_generator(9)])
    assert batch[1] == alone[0]


def test_temperature_to_zero_converges_to_greedy():
    logits = torch.randn(4, 64)
    best = greedy(logits)
    masses = [float(logits_to_probs(logits, t).gather(1, best[:, None]).min()) for t in (1.0, 0.3, 0.1, 0.01)]
    assert masses == sorted(masses) and masses[-1] > 0.999
    g = make_generator(0)
    for _ in range(20):
        assert torch.equal(sample(logits, 1e-4, 0.9, generator=g), best)
    assert torch.equal(sample(logits, 0.0, 0.9), best)
    mixed = sample(logits, torch.tensor([0.0, 1.0, 0.0, 1.0]), 1.0, generator=g)
    assert mixed[0] == best[0] and mixed[2] == best[2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(top_p=torch.tensor([0.5, 1.2])), "top_p"),
])
def test_bad_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling_args(**kwargs)
