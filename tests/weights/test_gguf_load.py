"""GGUF tensors into the int8/int4 kernels (weights/gguf_load.py): every type the `gguf` package
dequantizes, checked against the package's own values; the per-tensor choice; files mixing types;
tied embeddings; the loaded size. Files here are written by our save_gguf from raw blocks (a tensor
given as (bytes, GGML type) is written as it is: the package cannot quantize K- and IQ-types;
tests/weights/test_gguf_llama_cpp.py uses llama.cpp's own quantizer). The expected values come from the
bytes themselves or the package's own dequantization, never from our loader."""

import numpy as np
import pytest
import torch

import gguf
from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.core.tokenizer_formats import _sentencepiece_proto
from annotated_llama.transforms.quantize import Int4Linear, Int8Embedding, Int8Linear, quantize_int4, unpack_nibbles
from annotated_llama.weights import load_model, save_model
from annotated_llama.weights.gguf import read_gguf, save_gguf
from annotated_llama.weights.gguf_load import fit_int4, kernel_for

from fixtures import cli


T = gguf.GGMLQuantizationType
EXACT = [T.Q4_0, T.Q4_1, T.Q4_K]
INT8 = [T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q8_0]
REFIT = [T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K, T.IQ3_XXS, T.IQ3_S, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_S,
         T.IQ1_M, T.TQ1_0, T.TQ2_0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The models' vocabulary: 320 made-up SentencePiece pieces (3 specials, 256 bytes, 61 words)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + [f"▁w{i}" for i in range(61)]
    scores, types = [0.0] * 259 + [-float(i) for i in range(61)], [2, 3, 3] + [6] * 256 + [1] * 61
    path = tmp_path_factory.mktemp("vocab") / "tokenizer.model"
    path.write_bytes(_sentencepiece_proto(tokens, scores, types, 0, 1, 2, True))
    return Tokenizer(path)


def random_blocks(ttype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw bytes (rows, bytes per row) of a tensor of `ttype`: random bytes, each block redrawn until
    the package dequantizes it to a largest |value| between 0.1 and 1 (random fp16 scales are
    often huge or tiny; real weights' blocks are of one magnitude)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[ttype]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for _ in range(1000):
        with np.errstate(all="ignore"):
            w = gguf.quants.dequantize(data, ttype).reshape(len(data), block)
        top = np.abs(w).max(1)
        bad = ~((top > 0.1) & (top < 1))
        if not bad.any():
            return data.reshape(rows, -1)
        data[bad] = rng.integers(0, 256, (int(bad.sum()), size), dtype=np.uint8)
    raise AssertionError(f"no finite {ttype.name} blocks")


def nibbles_of(ttype, raw: np.ndarray, cols: int) -> np.ndarray:
    """The 4-bit integers of Q4_0/Q4_1/Q4_K rows read straight from the bytes (ggml-common.h):
    Q4_0/Q4_1 keep weight j of a block in the low nibble of byte j, weight j + 16 in the high one;
    Q4_K keeps, per 64 weights, weight l in the low nibble of byte l and l + 32 in the high one."""
    rows = raw.shape[0]
    if ttype == T.Q4_K:
        qs = raw.reshape(-1, 144)[:, 16:].reshape(-1, 4, 32)  # (super-blocks, 4 chunks of 64 weights, 32 bytes)
        return np.concatenate([qs & 15, qs >> 4], axis=2).reshape(rows, cols)
    qs = raw.reshape(-1, 18 if ttype == T.Q4_0 else 20)[:, -16:]  # (blocks, 16 bytes)
    return np.concatenate([qs & 15, qs >> 4], axis=1).reshape(rows, cols)


def tensor_of(ttype, raw: np.ndarray, cols: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, ttype)).reshape(raw.shape[0], cols)


def load_one(tmp_path, tok, ttype, dim=512, seed=0):
    """(the model load_model made of a file whose wq holds random blocks of `ttype`, everything
    else F32; those bytes; the package's float values of them)."""
    args = ModelArgs(dim=dim, n_layers=1, n_heads=dim // 64, vocab_size=tok.n_words, hidden_dim=256, max_seq_len=64)
    sd = dict(Transformer(args).state_dict())
    raw = random_blocks(ttype, dim, dim, seed)
    sd["layers.0.attention.wq.weight"] = (raw, ttype)
    save_gguf(tmp_path / f"{ttype.name}.gguf", args, sd, tok)
    written = read_gguf(tmp_path / f"{ttype.name}.gguf")[1]["blk.0.attn_q.weight"]
    assert written[0] == ttype and written[1] == (dim, dim) and np.array_equal(written[2].reshape(raw.shape), raw)
    model, _ = load_model(tmp_path / f"{ttype.name}.gguf")
    return model, raw, tensor_of(ttype, raw, dim)


@pytest.mark.parametrize("ttype", EXACT, ids=lambda t: t.name)
def test_q4_types_carry_their_integers_into_int4(tmp_path, tok, ttype):
    m, raw, w = load_one(tmp_path, tok, ttype)
    wq = m.layers[0].attention.wq
    assert isinstance(wq, Int4Linear) and wq.group_size == 32
    # the integers are the file's, read independently of the package's dequantization (but for
    # groups whose scale is 0, where any integer gives the same values)
    s, zero = wq.group_scales, wq.group_mins + 8 * wq.group_scales  # (N, G)
    ours, theirs = unpack_nibbles(wq.nibbles).view(*s.shape, 32), torch.from_numpy(nibbles_of(ttype, raw, w.shape[1]))
    assert torch.equal(ours[s != 0], theirs.view(*s.shape, 32)[s != 0]) and (s != 0).float().mean() > 0.9
    # the values: the package's, up to the bf16 rounding (2^-9 relative) of each group's scale and zero
    bound = 2 ** -8 * (8 * s.abs() + zero.abs())  # |q - 8| <= 8
    err = (wq.dequantized() - w).abs().view(*s.shape, 32)
    assert (err <= bound[..., None] + 1e-7).all()
    assert err.max() > 0  # bf16 did round something: the check is not vacuous


@pytest.mark.parametrize("ttype", INT8, ids=lambda t: t.name)
def test_5_to_8_bit_types_become_int8_per_row(tmp_path, tok, ttype):
    m, _, w = load_one(tmp_path, tok, ttype)
    wq = m.layers[0].attention.wq
    assert isinstance(wq, Int8Linear)
    row_max = w.abs().amax(1, keepdim=True)
    # round to nearest per row (half a step of max/127) and the bf16 rounding of the row's scale
    assert ((wq.dequantized() - w).abs() <= row_max / 254 + row_max * 2 ** -8 + 1e-7).all()


@pytest.mark.parametrize("ttype", REFIT, ids=lambda t: t.name)
def test_other_low_bit_types_are_refit_into_int4(tmp_path, tok, ttype):
    m, _, w = load_one(tmp_path, tok, ttype, seed=1)
    wq = m.layers[0].attention.wq
    assert kernel_for(ttype) == "int4" and isinstance(wq, Int4Linear)
    q, s, mn = fit_int4(w, 32)
    assert torch.equal(unpack_nibbles(wq.nibbles), q)  # what the loader stored
    fit = (q.float().view(*s.shape, 32) * s[..., None] + mn[..., None]).view(w.shape) - w
    q, s, mn = quantize_int4(w, 32)
    rtn = (q.float().view(*s.shape, 32) * s[..., None] + mn[..., None]).view(w.shape) - w
    # never worse than round to nearest, group by group
    assert (fit.view(*s.shape, 32).square().sum(-1) <= rtn.view(*s.shape, 32).square().sum(-1) * (1 + 1e-5) + 1e-12).all()
    print(f"{ttype.name}: relative RMS error, fit {fit.norm() / w.norm():.4f}, round to nearest {rtn.norm() / w.norm():.4f}")


def test_fit_int4_beats_round_to_nearest_on_iq4_levels():
    # IQ4_NL's 16 non-uniform levels (ggml-common.h kvalues_iq4nl), times a scale per block of 32
    levels = torch.tensor([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.0])
    g = torch.Generator().manual_seed(0)
    w = levels[torch.randint(0, 16, (256, 512), generator=g)] * torch.rand(256, 16, 1, generator=g).repeat_interleave(
        32, 1).view(256, 512, 1)[..., 0] / 127
    q, s, m = quantize_int4(w, 32)
    rtn = ((q.float().view(256, 16, 32) * s[..., None] + m[..., None]).view(256, 512) - w).square().mean()
    q, s, m = fit_int4(w, 32)
    fit = ((q.float().view(256, 16, 32) * s[..., None] + m[..., None]).view(256, 512) - w).square().mean()
    assert fit < 0.8 * rtn


def mixed_model(tmp_path, tok, tie=False, embedding=T.Q8_0):
    """A 1-layer dim-256 model whose matrices are each of another type, as a llama.cpp mix is."""
    args = ModelArgs(dim=256, n_layers=1, n_heads=4, vocab_size=tok.n_words, hidden_dim=512, max_seq_len=64,
                     tie_word_embeddings=tie)
    model = Transformer(args).eval()
    types = {"tok_embeddings.weight": T.Q4_K, "output.weight": T.Q6_K, "layers.0.attention.wq.weight": T.Q4_K,
             "layers.0.attention.wk.weight": T.Q5_K, "layers.0.attention.wv.weight": T.Q6_K,
             "layers.0.attention.wo.weight": T.Q4_0, "layers.0.feed_forward.w1.weight": T.IQ4_XS,
             "layers.0.feed_forward.w2.weight": T.Q8_0, "layers.0.feed_forward.w3.weight": T.F16}
    if tie:
        types["tok_embeddings.weight"] = embedding
    tensors, reference = {}, {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        ttype = types.get(name, T.F32)
        if ttype == T.F32:  # the writer's own encoding (float32 model, no dtype: F32)
            tensors[name], reference[name] = t, t.clone()
            continue
        if ttype == T.F16:
            data = t.numpy().astype(np.float16)
            tensors[name], reference[name] = (data, ttype), torch.from_numpy(data.astype(np.float32))
            continue
        if ttype in (T.Q4_0, T.Q8_0):  # types the package can write: from the model's weights
            raw = gguf.quants.quantize(t.numpy(), ttype)
        else:
            raw = random_blocks(ttype, *t.shape, seed=i)
        tensors[name], reference[name] = (raw, ttype), tensor_of(ttype, raw, t.shape[1])
    if tie:
        reference["output.weight"] = reference["tok_embeddings.weight"]
    save_gguf(tmp_path / "mixed.gguf", args, tensors, tok)  # tied: no output.weight written
    ref = Transformer(args).eval()
    ref.load_state_dict(reference)
    return tmp_path / "mixed.gguf", ref


def test_a_file_mixing_types_loads_each_tensor_into_its_kernel(tmp_path, tok):
    path, ref = mixed_model(tmp_path, tok)
    model, tok = load_model(path)
    a, f = model.layers[0].attention, model.layers[0].feed_forward
    kinds = {"wq": a.wq, "wk": a.wk, "wv": a.wv, "wo": a.wo, "w1": f.w1, "w2": f.w2, "w3": f.w3, "output": model.output}
    assert {k: type(v).__name__ for k, v in kinds.items()} == {
        "wq": "Int4Linear", "wk": "Int8Linear", "wv": "Int8Linear", "wo": "Int4Linear", "w1": "Int4Linear",
        "w2": "Int8Linear", "w3": "CastLinear", "output": "Int8Linear"}
    assert isinstance(model.tok_embeddings, Int8Embedding) and f.w3.weight.dtype == torch.float16  # as stored
    assert model.quantization["mode"] == "int4" and model.quantization["gguf_types"]["Q4_K"] == 2
    tokens = torch.randint(0, tok.n_words, (2, 40))
    with torch.no_grad():
        expected = ref(tokens, cache=False)
        got = model(tokens, cache=False)
        floats, _ = load_model(path, dtype=torch.float32)  # tensor by tensor, dequantized by the package
        assert torch.equal(floats(tokens, cache=False), expected)
    err = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"mixed file, kernels vs the package's float values: max |logit error| / max |logit| = {err:.3f}")
    assert err < 0.15  # random blocks vary 10x in magnitude within a row: int8 per row loses the small ones
    # generation works on the loaded model as it is (the KV cache path)
    with torch.no_grad():
        model(tokens[:, :20], 0)
        step = model(tokens[:, 20:21], 20)[:, -1]
    assert torch.allclose(step, got[:, 20], atol=1e-3 * got.abs().max())


@pytest.mark.parametrize("embedding", [T.Q8_0, T.F16], ids=lambda t: t.name)
def test_a_gguf_without_output_weight_loads_tied(tmp_path, tok, embedding):
    path, ref = mixed_model(tmp_path, tok, tie=True, embedding=embedding)
    assert "output.weight" not in read_gguf(path)[1]
    model, _ = load_model(path)
    assert model.params.tie_word_embeddings
    if embedding == T.Q8_0:
        assert isinstance(model.output, Int8Linear) and model.tok_embeddings.qweight is model.output.weight  # one matrix
    else:
        assert model.output.weight is model.tok_embeddings.weight
    assert model.tok_embeddings.weight.dtype == torch.float32  # the engine's KV cache takes this dtype
    floats, _ = load_model(path, dtype="f32")
    assert floats.output.weight is floats.tok_embeddings.weight
    tokens = torch.randint(0, tok.n_words, (1, 30))
    with torch.no_grad():
        expected = ref(tokens, cache=False)
        assert torch.equal(floats(tokens, cache=False), expected)
        got = model(tokens, cache=False)
        model(tokens[:, :29], 0)
        step = model(tokens[:, 29:], 29)[:, -1]
    assert (got - expected).abs().max() / expected.abs().max() < 0.15
    assert torch.allclose(step, got[:, 29], atol=1e-3 * got.abs().max())


def test_loaded_quantized_model_is_about_the_file_size(tmp_path, spm_path):
    # the bytes the model holds (bench/gguf_memory.py measures resident memory on a 134M model)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=32000, hidden_dim=512, max_seq_len=64)
    model = Transformer(args).eval()
    for dtype, bound in (("q8_0", 1.0), ("q4_0", 1.25)):
        path = tmp_path / f"m-{dtype}.gguf"
        save_model(model, Tokenizer(spm_path), path, format="gguf", dtype=dtype)
        tensors = read_gguf(path)[1]
        file_bytes = sum(raw.nbytes for _, _, raw in tensors.values())
        loaded, _ = load_model(path)
        held = {t.data_ptr(): t.numel() * t.element_size() for t in [*loaded.parameters(), *loaded.buffers()]
                if t is not loaded.rope_freqs}
        print(f"{dtype}: model {sum(held.values()) / file_bytes:.2f} x the file's tensor bytes")
        assert sum(held.values()) <= bound * file_bytes


def test_a_type_the_package_cannot_dequantize_is_refused(tmp_path, tok):

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=tok.n_words, hidden_dim=128, max_seq_len=64)
    sd = dict(Transformer(args).state_dict())
    sd["layers.0.attention.wq.weight"] = (np.zeros((64, 64), dtype=np.int8), T.I8)
    save_gguf(tmp_path / "i8.gguf", args, sd, tok)
    r = cli("convert", tmp_path / "i8.gguf", tmp_path / "out", "--to", "hf", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "i8.gguf" in r.stderr and "blk.0.attn_q.weight" in r.stderr and "I8" in r.stderr
