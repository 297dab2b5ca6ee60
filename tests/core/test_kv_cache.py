"""The paged KV cache: memory follows the tokens held, blocks come back, forks copy on write."""

import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.core.kv_cache import CacheFull, KVCache

from fixtures import tiny_model


def test_a_long_context_model_allocates_nothing_up_front():
    args = ModelArgs.from_name("tiny", max_seq_len=131072)
    model = Transformer(args).eval()
    cache = KVCache.for_model(model, max_tokens=8 * args.max_seq_len)  # a budget of 1M positions
    assert cache.capacity == 1 and cache.bytes_allocated() == cache.block_size * cache.bytes_per_token
    with torch.no_grad():
        model.step(torch.zeros(1, 40, dtype=torch.long), torch.arange(40)[None], cache.plan(["a"], [0], [40], 40))
    assert cache.blocks_used() == 3 and cache.tokens_held() == 40
    assert cache.capacity <= 8  # grown by doubling to what is held, not to the budget
    # Meta's forward keeps its own cache, also paged: nothing until the first call
    assert model.cache is None
    model(torch.zeros(2, 5, dtype=torch.long))
    assert model.cache.tokens_held() == 10 and model.cache.capacity <= 4


def test_blocks_are_freed_and_reused():
    cache = KVCache(2, 2, 8, max_tokens=64, block_size=4)
    cache.plan(["a", "b"], [0, 0], [10, 7], 10)
    assert cache.blocks_used() == 3 + 2
    cache.free("a")
    assert cache.blocks_used() == 2 and "a" not in cache.tables
    before = cache.capacity
    cache.plan(["c"], [0], [12], 12)  # takes a's three blocks back: the pool does not grow
    assert cache.capacity == before and cache.blocks_used() == 5
    cache.reset()
    assert cache.blocks_used() == 0 and cache.tokens_held() == 0


def test_the_budget_is_enforced():
    cache = KVCache(1, 1, 4, max_tokens=16, block_size=4)
    cache.plan(["a"], [0], [12], 12)
    with pytest.raises(CacheFull, match="budget"):
        cache.plan(["b"], [0], [8], 8)
    cache.free("a")
    cache.plan(["b"], [0], [16], 16)  # the whole budget, once a is gone


def test_growth_keeps_what_is_cached():
    model = tiny_model(0, "tiny-gqa")
    tokens = torch.randint(0, 512, (1, 60))
    cache = KVCache.for_model(model, max_tokens=256, block_size=4)
    with torch.no_grad():
        full = model(tokens, cache=False)[0]
        steps = []
        for t in range(60):  # one token at a time: the pool doubles several times under the sequence
            steps.append(model.step(tokens[:, t:t + 1], torch.tensor([[t]]), cache.plan(["a"], [t], [1], 1))[0, 0])
    assert (torch.stack(steps) - full).abs().max() < 1e-5


def test_a_fork_shares_the_prompt_and_copies_on_write():
    model = tiny_model(0, "tiny")
    prompt = torch.randint(0, 512, (1, 10))
    cache = KVCache.for_model(model, max_tokens=128, block_size=4)
    with torch.no_grad():
        model.step(prompt, torch.arange(10)[None], cache.plan(["p"], [0], [10], 10))
        cache.fork("p", "q")
        used = cache.blocks_used()
        assert used == 3 and cache.refs[cache.tables["q"][0]] == 2  # shared, not copied
        # each continues differently: the shared partial block (positions 8-9) is copied first
        a = model.step(torch.tensor([[5]]), torch.tensor([[10]]), cache.plan(["p"], [10], [1], 1))[0, 0]
        b = model.step(torch.tensor([[6]]), torch.tensor([[10]]), cache.plan(["q"], [10], [1], 1))[0, 0]
        assert cache.blocks_used() == used + 1 and cache.tables["p"][:2] == cache.tables["q"][:2]
        want_a = model(torch.cat([prompt, torch.tensor([[5]])], 1), cache=False)[0, -1]
        want_b = model(torch.cat([prompt, torch.tensor([[6]])], 1), cache=False)[0, -1]
    assert (a - want_a).abs().max() < 1e-5 and (b - want_b).abs().max() < 1e-5
    cache.free("p")
    assert all(cache.refs[x] == 1 for x in cache.tables["q"])


def test_writing_past_the_end_of_a_sequence_is_refused():
    cache = KVCache(1, 1, 4, max_tokens=64)
    cache.plan(["a"], [0], [5], 5)
    with pytest.raises(ValueError, match="holds 5 positions"):
        cache.plan(["a"], [7], [1], 1)


def test_truncate_gives_back_whole_blocks():
    cache = KVCache(1, 1, 4, max_tokens=64, block_size=4)
    cache.plan(["a"], [0], [13], 13)
    cache.truncate("a", 6)
    assert cache.lengths["a"] == 6 and len(cache.tables["a"]) == 2 and cache.blocks_used() == 2
