"""The model against HF transformers' LlamaForCausalLM, and the KV cache against recompute."""

import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.weights.hf import hf_to_meta_state_dict, meta_to_hf_state_dict

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "mha": dict(dim=64, n_layers=2, n_heads=4, vocab_size=101, multiple_of=32),
    "gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, multiple_of=32),
    "mqa": dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=1, vocab_size=97, multiple_of=16, norm_eps=1e-6),
    "theta500k": dict(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=101, rope_theta=500000.0),
    "llama31-scaling": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=101, rope_theta=500000.0,
                            use_scaled_rope=True, rope_original_context=32, max_seq_len=256),
    "odd-multiple-of": dict(dim=72, n_layers=2, n_heads=6, vocab_size=101, multiple_of=7, ffn_dim_multiplier=1.3),
}


def hf_model(args: ModelArgs):
    config = transformers.LlamaConfig(**args.to_hf_config())
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them to test the scaling too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_transformers(name):
    args = ModelArgs(**{"max_seq_len": 256, **CONFIGS[name]})
    ref = hf_model(args)
    assert ref.config.intermediate_size == args.ffn_hidden_dim
    ours = Transformer(args).eval()
    ours.load_state_dict(hf_to_meta_state_dict(ref.state_dict(), args))

    tokens = torch.randint(0, args.vocab_size, (3, 77))
    with torch.no_grad():
        expected = ref(tokens).logits.float()
        got = ours(tokens, cache=False)
        got_cached = ours(tokens)  # prefill through the KV cache
    err = (got - expected).abs().max().item()
    print(f"{name}: max abs logit error vs HF = {err:.2e}")
    assert err < 1e-4
    assert (got_cached - expected).abs().max().item() < 1e-4


def test_hf_round_trip_is_exact():
    args = ModelArgs(**CONFIGS["gqa"])
    sd = Transformer(args).state_dict()
    back = hf_to_meta_state_dict(meta_to_hf_state_dict(sd, args), args)
    assert sd.keys() == back.keys()
    for k in sd:
        assert torch.equal(sd[k], back[k]), k


def test_llama31_scaling_changes_only_long_wavelengths():
    from annotated_llama.core.model import rope_frequencies
    base = ModelArgs(dim=256, n_layers=1, n_heads=2, rope_theta=500000.0)
    scaled = ModelArgs(dim=256, n_layers=1, n_heads=2, rope_theta=500000.0, use_scaled_rope=True)
    f0, f1 = rope_frequencies(base), rope_frequencies(scaled)
    wavelen = 2 * torch.pi / f0
    short, long_ = wavelen < 8192 / 4, wavelen > 8192
    assert torch.equal(f0[short], f1[short])
    torch.testing.assert_close(f1[long_], f0[long_] / 8)
    mid = ~short & ~long_
    assert mid.any() and ((f1[mid] < f0[mid]) & (f1[mid] > f0[mid] / 8)).all()


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa", "tiny-llama3"])
def test_incremental_decoding_equals_full_forward(preset):
    model = Transformer(ModelArgs.from_name(preset)).eval()
    tokens = torch.randint(0, model.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(tokens, cache=False)
        steps = [model(tokens[:, :17], 0)]  # prefill
        steps.append(model(tokens[:, 17:25], 17))  # a chunk (chunked prefill mask)
        for t in range(25, 40):  # then one token at a time
            steps.append(model(tokens[:, t:t + 1], t))
    incremental = torch.cat(steps, dim=1)
    assert (incremental - full).abs().max().item() < 1e-5


def test_ragged_rows_in_one_call_equal_each_row_alone():
    # The engine's contract: rows of one call at their own positions, each reading its own
    # blocks of the paged cache; the right padding of a short row writes the scratch block.
    from annotated_llama.core.kv_cache import KVCache
    model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    a, b = torch.randint(0, 512, (12,)), torch.randint(0, 512, (5,))
    cache = KVCache.for_model(model, max_tokens=64, block_size=4)
    tokens = torch.zeros(2, 12, dtype=torch.long)
    tokens[0], tokens[1, :5] = a, b
    with torch.no_grad():
        out = model.step(tokens, torch.arange(12).expand(2, 12), cache.plan(["a", "b"], [0, 0], [12, 5], 12))
        nxt = model.step(torch.tensor([[3], [4]]), torch.tensor([[12], [5]]), cache.plan(["a", "b"], [12, 5], [1, 1], 1),
                         logits_at=torch.tensor([0, 0]))  # (2, V): only the asked-for position
        alone_a = model(torch.cat([a, torch.tensor([3])])[None], cache=False)
        alone_b = model(torch.cat([b, torch.tensor([4])])[None], cache=False)
    assert (out[0] - alone_a[0, :12]).abs().max() < 1e-5
    assert (out[1, :5] - alone_b[0, :5]).abs().max() < 1e-5
    assert nxt.shape == (2, 512)
    assert (nxt[0] - alone_a[0, 12]).abs().max() < 1e-5
    assert (nxt[1] - alone_b[0, 5]).abs().max() < 1e-5
    assert torch.isfinite(out).all()


def test_state_dict_has_metas_names_only():
    model = Transformer(ModelArgs.from_name("tiny"))
    names = set(model.state_dict())
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    model(torch.zeros(1, 3, dtype=torch.long))  # allocates the caches: still not in the state dict
    assert names == expected == set(model.state_dict())


def test_bfloat16_model_keeps_float32_rope_and_returns_float32_logits():
    model = Transformer(ModelArgs.from_name("tiny")).to(torch.bfloat16)
    assert model.rope_freqs.dtype == torch.float32
    out = model(torch.zeros(1, 4, dtype=torch.long))
    assert out.dtype == torch.float32


def test_sequence_longer_than_context_is_rejected():
    model = Transformer(ModelArgs.from_name("tiny", max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rows_at_different_lengths_continue_each_row():
    # Continuous batching: rows at different lengths decode together (two tokens per row here),
    # each as if alone; blocks are not consecutive once rows interleave, so the gather path runs.
    from annotated_llama.core.kv_cache import KVCache
    model = Transformer(ModelArgs.from_name("tiny-gqa")).eval()
    a, b = torch.randint(0, 512, (9,)), torch.randint(0, 512, (4,))
    cache = KVCache.for_model(model, max_tokens=64, block_size=2)
    with torch.no_grad():
        model.step(b[None], torch.arange(4)[None], cache.plan(["b"], [0], [4], 4))
        model.step(a[None], torch.arange(9)[None], cache.plan(["a"], [0], [9], 9))
        batch = cache.plan(["a", "b"], [9, 4], [2, 2], 2)
        assert batch.span is None and batch.block_table.shape == (2, 6)
        step = model.step(torch.tensor([[7, 8], [5, 6]]), torch.tensor([[9, 10], [4, 5]]), batch)
        alone_a = model(torch.cat([a, torch.tensor([7, 8])])[None], cache=False)
        alone_b = model(torch.cat([b, torch.tensor([5, 6])])[None], cache=False)
    assert (step[0] - alone_a[0, 9:]).abs().max() < 1e-5
    assert (step[1] - alone_b[0, 4:]).abs().max() < 1e-5


def test_a_long_context_config_costs_no_memory_up_front():
    # the rotary angles are computed for each call's positions (model.rope), not tabled for
    # 2 * max_seq_len positions as Meta does; and the KV cache is allocated as tokens arrive
    args = ModelArgs.from_name("tiny")
    short, long = Transformer(args), Transformer(ModelArgs(**{**args.to_params_json(), "max_seq_len": 131072}))
    size = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert size(long) == size(short) and long.cache is None
    pos = torch.tensor([[0, 1, 70000, 131071]])
    cos, sin = long.rope(pos)
    angles = pos[..., None].double() * long.rope_freqs.double()  # (1, 4, D/2), float64 reference
    torch.testing.assert_close(cos.double(), torch.cos(angles), atol=2e-3, rtol=0)
    torch.testing.assert_close(sin.double(), torch.sin(angles), atol=2e-3, rtol=0)
