"""Weight-only int8 / int4: kernels against a float dequantized reference, logits and
perplexity of a quantized model against the float model, checkpoints, the CLI."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from annotated_llama import ModelArgs, Transformer, load_model
from annotated_llama.transforms.quantize import (Int4Linear, Int8Linear, pack_nibbles, quantize_int4,
                                      quantize_int8, quantize_model, read_quantization, save_quantized,
                                      unpack_nibbles)

from fixtures import REPO

ROOT = REPO


@pytest.fixture(scope="module")
def trained():
    """A tiny byte-level model trained for a few seconds on model.py's text, and held-out bytes.
    Quantization error only shows on a model that learned something (random weights give
    perplexity ~ vocab whatever their precision)."""
    torch.manual_seed(0)
    data = torch.tensor(list((ROOT / "annotated_llama" / "core" / "model.py").read_bytes()), dtype=torch.long)
    split = int(len(data) * 0.9)
    train, val = data[:split], data[split:]
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        starts = torch.randint(0, len(train) - 65, (8,))
        batch = torch.stack([train[s:s + 65] for s in starts])  # (16, 65)
        logits = model(batch[:, :-1], cache=False)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), val


def perplexity(model, val: torch.Tensor, T: int = 64) -> float:
    n = (len(val) - 1) // T
    x = val[: n * T].view(n, T)  # (n, T)
    y = val[1: n * T + 1].view(n, T)
    with torch.no_grad():
        logits = model(x, cache=False)
    return math.exp(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())


def test_int8_roundtrip_error_is_half_a_step():
    w = torch.randn(48, 96)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-6).all()  # round-to-nearest: at most half a step
    assert (q.abs().amax(1) == 127).all()  # the largest weight of each row uses the full range


def test_int4_groups_and_nibbles():
    w = torch.randn(32, 128)
    q, s, m = quantize_int4(w, 32)
    assert q.max() <= 15 and q.min() >= 0 and s.shape == m.shape == (32, 4)
    deq = (q.float().view(32, 4, 32) * s[..., None] + m[..., None]).view(32, 128)
    assert ((deq - w).abs().view(32, 4, 32) <= s[..., None] / 2 + 1e-6).all()
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert pack_nibbles(torch.tensor([[3, 10]], dtype=torch.uint8)).item() == 3 | (10 << 4)


@pytest.mark.parametrize("B", [1, 5])
def test_int8_kernel_matches_dequantized_matmul(B):
    lin = torch.nn.Linear(96, 48, bias=False)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(B, 3, 96)
    ref = x @ q.dequantized().T  # float32 reference of the same integers
    out = q(x)
    assert out.shape == (B, 3, 48) and out.dtype == torch.float32
    # bf16 activations: relative error ~2^-8 of the dot product's magnitude
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_matches_dequantized_matmul(group_size):
    lin = torch.nn.Linear(128, 64, bias=False)
    q = Int4Linear.from_linear(lin, group_size)
    x = torch.randn(4, 128)
    ref = x @ q.dequantized().T
    assert (q(x) - ref).abs().max() < 0.02 * ref.abs().max()
    # and the dequantized weight (the bf16 scales and zeros the kernel uses) is close to the original:
    # half a step per entry, plus bf16's rounding (2^-9 relative) of the scale (times |q - 8| <= 8) and zero
    step, w_max = lin.weight.abs().max() * 2 / 15, lin.weight.abs().max()
    assert (q.dequantized() - lin.weight).abs().max() < 0.5 * step + 2 ** -9 * (8 * step + w_max + 8 * step)


def test_int4_rejects_shapes_the_kernel_cannot_take():
    with pytest.raises(ValueError, match="int4"):
        Int4Linear(100, 64, 128)
    with pytest.raises(ValueError, match="mode"):
        quantize_model(Transformer(ModelArgs.from_name("tiny")), "int3")


def test_quantized_logits_close_and_perplexity_within_bounds(trained):
    model, val = trained
    base = perplexity(model, val)
    assert base < 40, "the fixture model should have learned something (byte perplexity well under 256)"
    x = val[:64][None]
    with torch.no_grad():
        ref = model(x, cache=False)
    ppl = {}
    for mode, logit_bound, ppl_bound in (("int8", 0.05, 0.01), ("int4", 0.5, 0.05)):
        q = quantize_model(copy.deepcopy(model), mode, group_size=32)
        kinds = {type(m) for m in q.modules()}
        assert (Int4Linear if mode == "int4" else Int8Linear) in kinds
        with torch.no_grad():
            out = q(x, cache=False)
        # stated bounds: max |logit error| relative to the logits' range
        assert (out - ref).abs().max() < logit_bound * (ref.max() - ref.min()), mode
        ppl[mode] = perplexity(q, val)
        assert ppl[mode] / base - 1 < ppl_bound, (mode, base, ppl[mode])
    assert ppl["int8"] != base  # the quantized model really differs


def test_quantized_model_cached_decode_matches_full_forward(trained):
    model, val = trained
    q = quantize_model(copy.deepcopy(model), "int8")
    x = val[:20][None]
    with torch.no_grad():
        full = q(x, cache=False)
        q.clear_cache()
        steps = [q(x[:, :10], 0)[:, -1]] + [q(x[:, i:i + 1], i)[:, -1] for i in range(10, 19)]
    assert torch.allclose(torch.stack(steps, 1), full[:, 9:19], atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_and_load_quantized_checkpoint(tmp_path, mode, spm_path):
    model = Transformer(ModelArgs.from_name("tiny-gqa", vocab_size=32000)).eval()
    q = quantize_model(model, mode, group_size=32)
    save_quantized(q, tmp_path / "q", tokenizer_model=spm_path.read_bytes())
    assert read_quantization(tmp_path / "q" / "model.safetensors") == {"mode": mode, "group_size": 32}
    assert (tmp_path / "q" / "tokenizer.model").read_bytes() == spm_path.read_bytes()
    assert not list((tmp_path / "q").glob("*.tmp"))
    loaded = load_model(tmp_path / "q")[0]
    x = torch.randint(0, 32000, (2, 12))
    with torch.no_grad():
        assert torch.equal(q(x, cache=False), loaded(x, cache=False))
    # int8 stores 1 byte per weight, int4 half a byte (plus scales): the file shrinks
    n_linear = sum(m.in_features * m.out_features for m in loaded.modules()
                   if isinstance(m, (Int8Linear, Int4Linear)))
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < n_linear * (1.3 if mode == "int8" else 0.8) + 4 * 2 * 32000 * 64 + 20000


def test_cli_quantize(tmp_path, spm_path):
    from safetensors.torch import save_file
    from annotated_llama.__main__ import main
    args = ModelArgs.from_name("tiny", vocab_size=32000)  # the tokenizer's vocabulary
    model = Transformer(args).eval()
    src = tmp_path / "src"
    src.mkdir()
    (src / "params.json").write_text(json.dumps(args.to_params_json()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "model.safetensors"))
    (src / "tokenizer.model").write_bytes(spm_path.read_bytes())
    assert main(["quantize", str(src), str(tmp_path / "dst"), "--mode", "int8"]) == 0
    loaded = load_model(tmp_path / "dst")[0]
    x = torch.randint(0, 32000, (1, 8))
    with torch.no_grad():
        err = (loaded(x, cache=False) - model(x, cache=False)).abs().max()
    assert err < 0.05
    assert (tmp_path / "dst" / "tokenizer.model").read_bytes() == spm_path.read_bytes()
    # load_model (and so generate --model, serve) reads the quantized dir as it is: the same
    # logits as the model quantized in memory, and the tokenizer beside it
    tok = load_model(tmp_path / "dst")[1]
    assert tok is not None and tok.n_words == 32000
    with torch.no_grad():
        assert torch.equal(quantize_model(copy.deepcopy(model), "int8")(x, cache=False), loaded(x, cache=False))
    # generate --quantize int8 quantizes the float checkpoint the same way
    from annotated_llama.cli.generate import add_arguments, build_llama
    import argparse
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    llama = build_llama(parser.parse_args(["--model", str(src), "--quantize", "int8", "hi"]))
    with torch.no_grad():
        assert torch.equal(llama.model(x, cache=False), loaded(x, cache=False))
    # bad input: one line naming the argument, exit 2, the destination left alone
    (tmp_path / "dst2").mkdir()
    (tmp_path / "dst2" / "model.safetensors").write_bytes(b"mine")
    assert main(["quantize", str(src), str(tmp_path / "dst2"), "--mode", "int8"]) == 2
    assert (tmp_path / "dst2" / "model.safetensors").read_bytes() == b"mine"
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "dst3")]) == 2


def test_int4_keeps_no_second_copy_and_its_packed_layout_is_undone():
    from annotated_llama.transforms.quantize import _cpu_layout, _unpack_cpu
    assert _cpu_layout() is not None  # this build's packing is one of the known layouts
    for N, K in ((144, 64), (80, 128), (48, 32), (4096 + 16, 64)):  # full blocks and a partial last one
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        assert torch.equal(_unpack_cpu(packed, N, K, _cpu_layout()), q.to(torch.uint8))
    lin = torch.nn.Linear(128, 80, bias=False)
    m = Int4Linear.from_linear(lin, 32)
    q, s, mn = quantize_int4(lin.weight.detach(), 32)
    assert m._nibbles is None  # the portable form is recomputed from the packed bytes, not held
    assert torch.equal(m.nibbles, pack_nibbles(q))
    assert torch.equal(m.group_scales, s.bfloat16().float())
    # filled row block by row block (as the GGUF loader does) it packs the same bytes
    rows = Int4Linear(128, 80, 32)
    rows.set_rows(0, q[:64], s[:64], mn[:64])
    rows.set_rows(64, q[64:], s[64:], mn[64:])
    assert torch.equal(rows.packed, m.packed) and torch.equal(rows.scales_and_zeros, m.scales_and_zeros)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_tied_model_stays_tied_as_one_int8_matrix(tmp_path, mode):
    from annotated_llama.transforms.quantize import Int8Embedding
    from safetensors import safe_open
    args = ModelArgs.from_name("tiny", tie_word_embeddings=True)
    model = Transformer(args).eval()
    x = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(x, cache=False)
    q = quantize_model(copy.deepcopy(model), mode, group_size=32)
    # the head is int8 in either mode, and the embedding gathers rows of that same matrix
    assert isinstance(q.output, Int8Linear) and isinstance(q.tok_embeddings, Int8Embedding)
    assert q.tok_embeddings.qweight is q.output.weight and q.tok_embeddings.scales is q.output.scales
    with torch.no_grad():
        out = q(x, cache=False)
        emb = q.tok_embeddings(x)
    assert torch.allclose(emb, q.output.dequantized()[x], atol=1e-6)  # the lookup reads the head's rows
    assert (emb - model.tok_embeddings(x)).abs().max() <= model.tok_embeddings.weight.abs().max() / 127
    assert (out - ref).abs().max() < (0.05 if mode == "int8" else 0.5) * (ref.max() - ref.min())
    save_quantized(q, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "tok_embeddings.weight" in f.keys() and not any(k.startswith("output.") for k in f.keys())
    loaded = load_model(tmp_path / "q")[0]
    assert loaded.output.weight is loaded.tok_embeddings.qweight
    with torch.no_grad():
        assert torch.equal(loaded(x, cache=False), out)
