"""GGUF: what we write is read back by llama.cpp's own `gguf` package with the expected keys,
shapes and values, and our reader loads it to the same logits; the header reader against
GGUFReader; the quantize/convert command lines. (Reading every type into the kernels:
test_gguf_load.py; agreement with llama.cpp itself: test_gguf_llama_cpp.py.)"""

import numpy as np
import pytest
import torch

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.weights import load_model, save_model

from fixtures import cli

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v", "attention.wo": "attn_output",
              "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
EXPECTED_TYPE = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q5_1": T.Q5_1, "q5_0": T.Q5_0,
                 "q4_1": T.Q4_1, "q4_0": T.Q4_0}
BITS = {"q8_0": 8, "q5_1": 5, "q5_0": 5, "q4_1": 4, "q4_0": 4}
ALL = list(EXPECTED_TYPE)


def gguf_name(meta: str) -> str:
    parts = meta.removesuffix(".weight").split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:])]}.weight"
    return GGUF_NAMES[".".join(parts)] + ".weight"


@pytest.fixture(scope="module")
def spm_model(spm_path):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32,
                     norm_eps=1e-6, max_seq_len=128)
    model = Transformer(args).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model, Tokenizer(spm_path)


@pytest.fixture(scope="module")
def written(spm_model, tmp_path_factory):
    """dtype -> (path, GGUFReader, reference weights): each file written and parsed once
    (GGUFReader takes seconds on a 32k vocabulary)."""
    model, tok = spm_model
    cache = {}

    def get(dtype):
        if dtype not in cache:
            path = tmp_path_factory.mktemp("gguf") / f"tiny-{dtype}.gguf"
            save_model(model, tok, path, format="gguf", dtype=dtype)
            reader = gguf.GGUFReader(path)
            cache[dtype] = path, reader, reference_weights(reader)
        return cache[dtype]
    return get


def field(reader, key):
    return reader.fields[key].contents()


def reference_weights(reader) -> dict[str, np.ndarray]:
    # gguf's own dequantization, the numpy shape as the package reports it (innermost last)
    out = {}
    for t in reader.tensors:
        data = t.data
        if t.tensor_type == T.BF16:
            data = data.view(np.uint16).astype(np.uint32) << 16  # bf16 bits -> f32 bits
            out[t.name] = data.view(np.float32)
        else:
            out[t.name] = gguf.quants.dequantize(data, t.tensor_type)
    return out


@pytest.mark.parametrize("dtype", ALL)
def test_written_gguf_reads_back_in_the_gguf_package(spm_model, written, dtype):
    model, tok = spm_model
    args = model.params
    path, reader, weights = written(dtype)

    assert field(reader, "general.architecture") == "llama"
    expected_keys = {"llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
                     "llama.feed_forward_length": args.ffn_hidden_dim, "llama.attention.head_count": 4,
                     "llama.attention.head_count_kv": 2, "llama.rope.dimension_count": 16,
                     "llama.vocab_size": 32000, "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1,
                     "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
                     "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    for key, value in expected_keys.items():
        assert field(reader, key) == value, key
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, "llama.rope.freq_base") == 10000.0
    assert field(reader, "general.file_type") == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q5_1": 9,
                                                    "q5_0": 8, "q4_1": 3, "q4_0": 2}[dtype]

    sp = tok.sp
    assert field(reader, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(32000)]
    scores = field(reader, "tokenizer.ggml.scores")
    assert scores[:300:7] == pytest.approx([sp.get_score(i) for i in range(0, 300, 7)])
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [2, 3, 3, 6] and types[3 + 256] == 1  # unk, <s>, </s>, <0x00>, then normal pieces

    sd = model.state_dict()
    by_name = {t.name: t for t in reader.tensors}
    assert set(by_name) == {gguf_name(k) for k in sd}
    for name, w in sd.items():
        t = by_name[gguf_name(name)]
        assert list(t.shape) == list(reversed(w.shape)), name  # GGUF lists dims innermost-first
        expected_type = T.F32 if w.dim() == 1 else EXPECTED_TYPE[dtype]
        if dtype in BITS and name == "output.weight":
            expected_type = T.Q8_0  # the head stays 8-bit in 4- and 5-bit files (llama.cpp keeps it at Q6_K)
        assert t.tensor_type == expected_type, name
        got = torch.from_numpy(np.ascontiguousarray(weights[t.name])).reshape(w.shape)
        if expected_type == T.F32:
            assert torch.equal(got, w), name
        elif expected_type == T.F16:
            assert torch.equal(got, w.half().float()), name
        elif expected_type == T.BF16:
            assert torch.equal(got, w.bfloat16().float()), name
        elif expected_type == T.Q8_0:  # per block of 32, d = max|w|/127 (in fp16), error <= d/2 (+ fp16's rounding of d)
            blocks = w.reshape(-1, 32)
            d = blocks.abs().amax(1, keepdim=True) / 127
            err = (got.reshape(-1, 32) - blocks).abs()
            assert (err <= d * 0.5 * 1.01 + d * 127 * 2 ** -11 + 1e-12).all(), name
            assert err.max() > 0  # it did quantize
        else:  # 4/5 bits per block of 32: d = max/-2^(b-1) (_0) or range/(2^b - 1) (_1): error <= max|w| / 2^(b-1)
            # (reached by _0's clipped far end: -max becomes (2^(b-1) - 1) d), plus fp16's rounding of d (15 d 2^-11)
            blocks = w.reshape(-1, 32)
            err = (got.reshape(-1, 32) - blocks).abs()
            bound = blocks.abs().amax(1, keepdim=True) / 2 ** (BITS[dtype] - 1)
            assert (err <= bound * (1 + 2 ** -6) + 1e-7).all() and err.max() > 0, name


@pytest.mark.parametrize("dtype", ALL)
def test_our_reader_gives_the_same_logits(spm_model, written, dtype):
    model, tok = spm_model
    path, _, weights = written(dtype)
    loaded, loaded_tok = load_model(path, dtype="f32")
    assert loaded.params.norm_eps == 1e-6 and loaded.params.rope_theta == 10000.0  # exact, not float32-rounded
    tokens = torch.randint(0, 32000, (2, 21))
    with torch.no_grad():
        got = loaded(tokens, cache=False)
        exact = model(tokens, cache=False)
        # the reference: the original model with its weights replaced by the gguf package's values
        reference = Transformer(model.params).eval()
        reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(weights[gguf_name(k)])).reshape(v.shape)
                                   for k, v in model.state_dict().items()})
        expected = reference(tokens, cache=False)
    assert torch.equal(got, expected)
    err = (got - exact).abs().max().item()
    print(f"GGUF {dtype}: max abs logit error vs the float32 model {err:.2e}")
    assert err < {"f32": 0.0, "f16": 5e-3, "bf16": 5e-2, "q8_0": 5e-2, "q5_1": 0.2, "q5_0": 0.2, "q4_1": 0.4,
                  "q4_0": 0.4}[dtype] or (dtype == "f32" and err == 0)
    for text in ["Hello world", "  spaces and 12345", "ünïcödé 🦙"]:
        assert loaded_tok.encode(text, True, True) == tok.encode(text, True, True)


def test_stored_dtype_is_kept_by_default(written):
    loaded, _ = load_model(written("bf16")[0])
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.norm.weight.dtype == torch.bfloat16  # 1-D tensors were F32 on disk; one dtype in memory


def test_llama31_rope_scaling_round_trip(tmp_path, spm_path):
    args = ModelArgs.from_name("tiny-llama3", vocab_size=32000)
    model = Transformer(args).eval()
    save_model(model, Tokenizer(spm_path), tmp_path / "l31.gguf", format="gguf", dtype="f32")
    reader = gguf.GGUFReader(tmp_path / "l31.gguf")
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert freqs.tensor_type == T.F32 and list(freqs.shape) == [args.head_dim // 2]
    loaded, _ = load_model(tmp_path / "l31.gguf")
    assert loaded.params.use_scaled_rope and loaded.params.rope_original_context == 64
    tokens = torch.randint(0, 32000, (1, 300))
    with torch.no_grad():
        assert torch.equal(loaded(tokens, cache=False), model(tokens, cache=False))


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_files_load_into_the_kernels_by_default(spm_model, written, dtype):
    from annotated_llama.transforms.quantize import Int4Linear, Int8Embedding, Int8Linear
    model, _ = spm_model
    path, _, weights = written(dtype)
    loaded, _ = load_model(path)  # dtype None: the int8/int4 kernels
    kind = Int4Linear if dtype == "q4_0" else Int8Linear
    assert all(isinstance(getattr(layer.attention, n), kind) for layer in loaded.layers for n in ("wq", "wo"))
    assert isinstance(loaded.output, Int8Linear) and isinstance(loaded.tok_embeddings, Int8Embedding)
    assert loaded.quantization["mode"] == ("int4" if dtype == "q4_0" else "int8")
    floats, _ = load_model(path, dtype="f32")
    tokens = torch.randint(0, 32000, (2, 21))
    with torch.no_grad():
        ref = floats(tokens, cache=False)
        err = ((loaded(tokens, cache=False) - ref).abs().max() / ref.abs().max()).item()
    print(f"{dtype}: kernels vs the package's float values, max |logit error| / max |logit| {err:.4f}")
    assert err < 0.05


def test_header_reader_agrees_with_gguf_reader(written, llama3_gguf_path):
    import time
    from annotated_llama.weights.gguf import read_gguf
    path, reader, _ = written("q4_0")
    meta, tensors, _ = read_gguf(path, vocabulary=True)
    for key, f in reader.fields.items():
        if not key.startswith("GGUF."):
            assert meta[key] == pytest.approx(f.contents()), key
    assert {t.name: (t.tensor_type, tuple(reversed(t.shape.tolist()))) for t in reader.tensors} == {
        k: (v[0], v[1]) for k, v in tensors.items()}
    assert all(np.array_equal(tensors[t.name][2], t.data.reshape(-1).view(np.uint8)) for t in reader.tensors)
    start = time.perf_counter()
    meta, _, _ = read_gguf(llama3_gguf_path, vocabulary=True)  # Llama 3: 128k tokens, 280k merges
    print(f"Llama 3 vocabulary header: {time.perf_counter() - start:.2f} s")
    assert len(meta["tokenizer.ggml.merges"]) > 200_000 and len(meta["tokenizer.ggml.tokens"]) == 128256


@pytest.mark.slow
def test_llama3_vocabulary_is_embedded_as_bpe(tmp_path, llama3_tokenizer):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=llama3_tokenizer.n_words, multiple_of=32)
    save_model(Transformer(args), llama3_tokenizer, tmp_path / "l3.gguf", format="gguf", dtype="q8_0")
    # GGUFReader takes ~8 s on 280k merges: the tokenizer module's header reader is enough here
    from annotated_llama.core.gguf_file import read_gguf
    meta = read_gguf((tmp_path / "l3.gguf").read_bytes(), vocabulary=True, tensors=False)[0]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.bos_token_id"] == 128000 and meta["tokenizer.ggml.eot_token_id"] == 128009
    merges = meta["tokenizer.ggml.merges"]
    assert len(merges) > 200_000  # Llama 3 ships ~280k merge rules
    assert merges[0] == "Ġ Ġ"  # rank 256 is two spaces (GPT-2's byte map writes space as Ġ)
    back = Tokenizer(tmp_path / "l3.gguf")
    for text in ["Hello world!", "  x = 12345;\n\tnew line", "ünïcödé 🦙 <|eot_id|>"]:
        assert back.encode(text, True, False) == llama3_tokenizer.encode(text, True, False)
    assert back.stop_ids == llama3_tokenizer.stop_ids


def test_gguf_convert_cli_and_bad_files(tmp_path, spm_model, written):

    model, tok = spm_model
    save_model(model, tok, tmp_path / "ours", format="ours")
    r = cli("convert", tmp_path / "ours", tmp_path / "m.gguf", "--to", "gguf", "--dtype", "q8_0", check=False)
    assert r.returncode == 0, r.stderr
    from annotated_llama.weights.gguf import read_gguf
    via_cli, via_api = read_gguf(tmp_path / "m.gguf")[1], read_gguf(written("q8_0")[0])[1]
    assert via_cli.keys() == via_api.keys()
    assert all(np.array_equal(via_cli[k][2], via_api[k][2]) for k in via_cli)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    r = cli("convert", tmp_path / "cut.gguf", tmp_path / "out", "--to", "hf", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cut.gguf" in r.stderr
    assert "truncated" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_llama_cpp_runs_our_gguf_with_the_same_greedy_tokens(spm_model, written):
    # Needs llama-cpp-python (the `bench` extra); the GGUF keys above are what it reads.
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tok = spm_model
    llm = llama_cpp.Llama(model_path=str(written("f32")[0]), n_ctx=128, n_threads=2, verbose=False)
    prompt = tok.encode("The llama is a domesticated", bos=True, eos=False)
    assert llm.tokenize(b"The llama is a domesticated", add_bos=True) == prompt  # the embedded vocabulary
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 24:
            break
    ours = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ours.append(int(model(torch.tensor([ours]), cache=False)[0, -1].argmax()))
    assert theirs == ours[len(prompt):]


def test_quantize_and_convert_write_gguf_types_and_protect_files(tmp_path, spm_model):
    from annotated_llama.weights.gguf import read_gguf

    model, tok = spm_model
    save_model(model, tok, tmp_path / "ours", format="ours")
    out = tmp_path / "m-q4_0.gguf"
    r = cli("quantize", tmp_path / "ours", out, "--mode", "q4_0", check=False)
    assert r.returncode == 0, r.stderr
    assert {t[0].name for t in read_gguf(out)[1].values()} == {"F32", "Q4_0", "Q8_0"}
    before = out.read_bytes()
    # an existing output is refused without --force, and left as it was
    for argv in (("quantize", tmp_path / "ours", out, "--mode", "q4_1"),
                 ("convert", tmp_path / "ours", out, "--to", "gguf", "--dtype", "q4_1")):
        r = cli(*argv, check=False)
        assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert out.read_bytes() == before
    r = cli("convert", tmp_path / "ours", out, "--to", "gguf", "--dtype", "q4_1", "--force", check=False)
    assert r.returncode == 0 and {t[0].name for t in read_gguf(out)[1].values()} == {"F32", "Q4_1", "Q8_0"}
    # never the input, even with --force; no temporary file left behind
    for argv in (("quantize", out, out, "--mode", "q8_0", "--force"), ("convert", out, out, "--to", "gguf", "--force"),
                 ("quantize", tmp_path / "ours", tmp_path, "--mode", "int8", "--force")):
        r = cli(*argv, check=False)
        assert r.returncode == 2 and "this command's input" in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    # from a quantized GGUF: int8 dirs and float layouts read its dequantized values (float32)
    r = cli("quantize", out, tmp_path / "q8dir", "--mode", "int8", check=False)
    assert r.returncode == 0, r.stderr
    r = cli("convert", out, tmp_path / "hf", "--to", "hf", check=False)
    assert r.returncode == 0, r.stderr
    hf, _ = load_model(tmp_path / "hf")
    floats, _ = load_model(out, dtype="f32")
    assert hf.tok_embeddings.weight.dtype == torch.float32
    assert torch.equal(hf.layers[0].attention.wv.weight, floats.layers[0].attention.wv.weight)
    r = cli("quantize", tmp_path / "ours", tmp_path / "q8dir", "--mode", "int4", "--force", check=False)
    assert r.returncode == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if ".old-" in p.name or ".tmp-" in p.name]
    r = cli("convert", tmp_path / "ours", tmp_path / "x", "--to", "hf", "--dtype", "q4_0", check=False)
    assert r.returncode == 2 and "--dtype q4_0" in r.stderr
