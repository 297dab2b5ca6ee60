"""The fast decode path against the plain model: same greedy tokens, logits within stated bounds."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from annotated_llama import ModelArgs, Transformer
from annotated_llama.fast import FastDecoder, prepare_fast
from annotated_llama.speculative import greedy_generate


def _model(name, seed=0, sharpen=1.0, **kw):
    torch.manual_seed(seed)
    m = Transformer(ModelArgs.from_name(name, **kw)).eval()
    with torch.no_grad():  # sharper logits: no near-ties for float rounding to flip
        m.output.weight.mul_(sharpen)
    return m


@pytest.fixture(scope="module")
def trained():
    """A tiny byte-level model trained for a few seconds on model.py's text. Greedy decoding in
    16-bit can only be expected to match float32 where the model is confident, as a trained model
    is; a random model's logits are nearly uniform (whatever their scale), so rounding flips ties."""
    torch.manual_seed(0)
    text = (Path(__file__).resolve().parents[1] / "annotated_llama" / "model.py").read_bytes()
    data = torch.tensor(list(text), dtype=torch.long)
    model = Transformer(ModelArgs.from_name("tiny-gqa", vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[s:s + 65] for s in starts])  # (8, 65)
        loss = F.cross_entropy(model(batch[:, :-1], cache=False).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [list(text[i:i + n]) for i, n in ((100, 12), (2000, 5), (5000, 20))]
    return model.eval(), prompts


def _teacher_forced(fd: FastDecoder, seq: list[int], n_prompt: int) -> torch.Tensor:
    """Fast-path logits (N, V) predicting seq[n_prompt:], one decode step per token."""
    B = 1
    fd.reset(B, 128)
    pad = torch.zeros(B, dtype=torch.long)
    rows = [fd.prefill(torch.tensor([seq[:n_prompt]]))[0]]
    for pos in range(n_prompt, len(seq) - 1):
        rows.append(fd.decode_step(torch.tensor([[seq[pos]]]), torch.tensor(pos), pad, fd.decode_weights(B))[0])
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-llama3"])
def test_float32_greedy_equals_plain_greedy(name):
    model = _model(name)
    fd = FastDecoder(model, "float32")
    prompts = [[1, 5, 9, 33, 2], [7, 8], [100] * 9]
    refs = [greedy_generate(model, p, 24) for p in prompts]
    assert [fd.generate([p], 24)[0] for p in prompts] == refs
    # a ragged batch (left-padded) gives each row what it gives alone
    assert fd.generate(prompts, 24) == refs


@pytest.mark.parametrize("mode", ["float32", "mixed"])
def test_matvec_mv_path_matches_linear(mode):
    model = _model("tiny-gqa", seed=6)
    seq = torch.randint(0, 512, (20,)).tolist()
    a = _teacher_forced(FastDecoder(model, mode, matvec="mv"), seq, 8)
    b = _teacher_forced(FastDecoder(model, mode), seq, 8)
    assert (a - b).abs().max() < (1e-4 if mode == "float32" else 2e-2) * (b.max() - b.min())


@pytest.mark.parametrize("mode,bound", [("float32", 1e-4), ("mixed", 0.02), ("bfloat16", 0.03),
                                        ("float16", 0.02), ("int8", 0.03), ("int4", 0.15)])
def test_teacher_forced_logits_within_bounds(mode, bound):
    # dims that the int4 kernel takes (multiples of 32); stated bound: max |error| relative
    # to the range of the reference logits, over a prefill and 20 decode steps
    model = _model("tiny", seed=1, dim=128, n_heads=4)
    seq = torch.randint(0, 512, (30,)).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([seq]), cache=False)[0, 9:29]  # (20, V): predicting seq[10:30]
    fast = _teacher_forced(FastDecoder(model, mode, group_size=32), seq, 10)
    err = (fast - ref).abs().max() / (ref.max() - ref.min())
    assert err < bound, (mode, float(err))


def _agrees_up_to_a_near_tie(model, prompt, out, ref, tol):
    """out == ref, or they part where float32's top two logits are within tol of the logits'
    range: a tie that rounding may flip. A broken path parts at a confident step and fails."""
    j = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), None)
    if j is None:
        return len(out) == len(ref)
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt) + ref[:j]]), cache=False)[0, -1]
    top2 = logits.topk(2).values
    return bool(top2[0] - top2[1] < tol * (logits.max() - logits.min()))


def test_mixed_greedy_equals_float32_greedy_on_a_trained_model(trained):
    # float16 decode + bfloat16 prefill, batch 1: exactly the float32 tokens
    model, prompts = trained
    refs = [greedy_generate(model, p, 24) for p in prompts]
    assert [FastDecoder(model, "mixed").generate([p], 24)[0] for p in prompts] == refs


@pytest.mark.parametrize("mode", ["bfloat16", "int8"])
def test_bf16_and_int8_greedy_agree_up_to_near_ties(trained, mode):
    model, prompts = trained
    fd = FastDecoder(model, mode)
    for p in prompts:
        ref = greedy_generate(model, p, 24)
        assert _agrees_up_to_a_near_tie(model, p, fd.generate([p], 24)[0], ref, 0.05), (mode, p)


def test_per_phase_dtypes():
    model = _model("tiny")
    fd = FastDecoder(model, "mixed")
    # float16 only for batch-1 decode (fast matrix-vector); bfloat16 wherever a matmul has rows
    assert fd.decode_weights(1).dtype == torch.float16
    assert fd.decode_weights(4).dtype == torch.bfloat16
    assert fd.prefill_w.dtype == torch.bfloat16
    assert fd.decode_weights(1).layers[0]["wqkv"].dtype == torch.float16
    # the model itself is untouched
    assert model.layers[0].attention.wq.weight.dtype == torch.float32


def test_mixed_batched_decode_matches_float32(trained):
    # batch > 1 runs on the bfloat16 copy (and a ragged, left-padded batch): same tokens
    model, prompts = trained
    fd = prepare_fast(model, "mixed")
    outs = fd.generate(prompts, 16)
    for p, out in zip(prompts, outs):
        assert _agrees_up_to_a_near_tie(model, p, out, greedy_generate(model, p, 16), 0.05)
    assert fd.stats["decode_tokens"] == 3 * 15


def test_stop_ids_and_seeded_sampling():
    model = _model("tiny", seed=4)
    fd = FastDecoder(model, "float32")
    ref = greedy_generate(model, [1, 2, 3], 20)
    out = fd.generate([[1, 2, 3]], 20, stop_ids=[ref[5]])[0]
    assert out == ref[: ref.index(ref[5]) + 1]
    a = fd.generate([[1, 2, 3]], 20, temperature=1.0, top_p=0.9, seed=7)
    b = fd.generate([[1, 2, 3]], 20, temperature=1.0, top_p=0.9, seed=7)
    c = fd.generate([[1, 2, 3]], 20, temperature=1.0, top_p=0.9, seed=8)
    assert a == b and a != c


def test_sampling_settings_reach_the_sampler():
    # (sampling.sample itself is tested in test_sampling.py) top-k 1 and a tiny top-p leave only
    # the best token, so sampling at any temperature must give the greedy tokens
    model = _model("tiny", seed=3)
    fd = FastDecoder(model, "float32")
    greedy = fd.generate([[1, 2, 3]], 16)
    assert fd.generate([[1, 2, 3]], 16, temperature=1.5, top_k=1, seed=4) == greedy
    assert fd.generate([[1, 2, 3]], 16, temperature=1.5, top_p=1e-6, seed=4) == greedy
    assert fd.generate([[1, 2, 3]], 16, temperature=1.5, seed=4) != greedy


def test_bad_arguments():
    fd = FastDecoder(_model("tiny"), "float32")
    with pytest.raises(ValueError, match="max_seq_len"):
        fd.generate([[1, 2]], 1000)
    with pytest.raises(ValueError, match="prompt"):
        fd.generate([[]], 4)
    with pytest.raises(ValueError, match="mode"):
        FastDecoder(_model("tiny"), "float8")


@pytest.mark.slow
def test_compiled_step_equals_eager():
    # torch.compile of the decode step (inductor's C++ backend on CPU): tens of seconds to build
    model = _model("tiny", seed=5)
    prompt = [5, 4, 3, 2]
    eager = FastDecoder(model, "float32").generate([prompt], 12)
    fd = FastDecoder(model, "float32", compile=True)
    compiled = fd.generate([prompt], 12)
    assert compiled == eager == [greedy_generate(model, prompt, 12)]
    assert fd._step is not None  # the decode steps really went through the compiled program


def test_multiply_and_sum_matvec_equals_linear():
    # the compiled batch-1 path's matrix-vector product, run eagerly here: float32 accumulation of
    # float32/bfloat16/int8 weights, for 1 and 3 rows, against F.linear on the same float values
    from annotated_llama.fast import _reduce_matvec
    from annotated_llama.quantize import Int4Linear, Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96, bias=False)
    for B in (1, 3):
        x = torch.randn(B, 1, 128)
        assert torch.allclose(_reduce_matvec(x, lin.weight.detach()), F.linear(x, lin.weight), atol=1e-5)
        wb, xb = lin.weight.detach().bfloat16(), x.bfloat16()
        ref = F.linear(xb.float(), wb.float())  # the exact products of the bf16 values
        got = _reduce_matvec(xb, wb)
        assert got.dtype == torch.bfloat16 and (got.float() - ref).abs().max() < 0.02 * ref.abs().max()
        q8 = Int8Linear.from_linear(lin)
        ref = F.linear(xb.float(), q8.dequantized())
        assert (_reduce_matvec(xb, q8).float() - ref).abs().max() < 0.02 * ref.abs().max()
        q4 = Int4Linear.from_linear(lin, 32)  # served by the packed kernel itself
        assert torch.equal(_reduce_matvec(xb, q4), q4(xb))


@pytest.mark.parametrize("H,K", [(4, 4), (8, 2)])
def test_written_out_attention_equals_sdpa(H, K):
    from annotated_llama.fast import _attend_one
    torch.manual_seed(1)
    B, L, D = 3, 20, 16
    q, ck, cv = torch.randn(B, H, 1, D), torch.randn(B, K, L, D), torch.randn(B, K, L, D)
    slots = torch.arange(L)
    pos, pad = torch.tensor(13), torch.tensor([0, 4, 9])
    mask = ((slots <= pos) & (slots >= pad[:, None]))[:, None, None]  # (B, 1, 1, L)
    ref = F.scaled_dot_product_attention(q, ck, cv, attn_mask=mask, enable_gqa=H != K)
    for compiled in (False, True):
        assert torch.allclose(_attend_one(q, ck, cv, mask, compiled), ref, atol=1e-5)


def test_packed_bfloat16_weights_equal_plain():
    # oneDNN's prepacked layout changes how the weights are stored, not the products
    from annotated_llama.fast import _apply_linear, _Weights
    model = _model("tiny")
    plain, packed = _Weights(model, torch.bfloat16), _Weights(model, torch.bfloat16, pack=True)
    assert packed.layers[0]["w13"].is_mkldnn and not plain.layers[0]["w13"].is_mkldnn
    torch.manual_seed(2)
    for rows in (1, 8, 33):
        x = torch.randn(rows, 1, model.params.dim).bfloat16()
        a, b = _apply_linear(x, plain.layers[0]["w13"]), _apply_linear(x, packed.layers[0]["w13"])
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= 0.01 * a.float().abs().max()


@pytest.mark.slow
def test_compiled_bfloat16_batch1_and_eager_batches(trained):
    # the CPU default when compiled: batch 1 through the compiled multiply-and-sum step (plain bf16
    # copy), ragged batches eagerly through the oneDNN-packed copy; both against the eager bf16 path
    model, prompts = trained
    compiled = FastDecoder(model, "bfloat16", compile=True)
    assert compiled.decode_w is not compiled.prefill_w and compiled.prefill_w.packed
    refs = [greedy_generate(model, p, 16) for p in prompts]
    for p, ref in zip(prompts, refs):
        assert _agrees_up_to_a_near_tie(model, p, compiled.generate([p], 16)[0], ref, 0.05), p
    for p, out, ref in zip(prompts, compiled.generate(prompts, 16), refs):
        assert _agrees_up_to_a_near_tie(model, p, out, ref, 0.05), ("batched", p)


def test_stream_yields_generate_tokens_and_ends_at_a_stop_id(trained):
    model, prompts = trained
    fd = FastDecoder(model, "float32")
    full = fd.generate([prompts[0]], 20)[0]
    assert list(fd.stream(prompts[0], 20)) == full
    stop = full[5]
    got = list(fd.stream(prompts[0], 20, stop_ids=[stop]))
    assert got == full[: full.index(stop) + 1]
    assert torch.is_grad_enabled()  # the generator's no_grad does not leak


def test_lora_layers_run_unfused_on_every_path():
    # a model with LoRA adapters (not merged): _fuse cannot concatenate LoRALinear weights, so the
    # fast path must run each layer itself, eagerly and on the multiply-and-sum path alike
    from annotated_llama.fast import _reduce_matvec, _Weights
    from annotated_llama.lora import apply_lora, lora_modules
    model = _model("tiny", seed=8)
    apply_lora(model, "all", r=4, alpha=8)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B, std=0.5)  # adapters that change the outputs
    x = torch.randn(1, 1, model.params.dim)
    wqkv = _Weights(model, torch.float32).layers[0]["wqkv"]
    assert torch.allclose(_reduce_matvec(x, wqkv), torch.cat([m(x) for m in wqkv], -1), atol=1e-5)
    prompt = [1, 2, 3]
    assert FastDecoder(model, "float32").generate([prompt], 12)[0] == greedy_generate(model, prompt, 12)
