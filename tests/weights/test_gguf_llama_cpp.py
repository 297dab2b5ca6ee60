"""Agreement with llama.cpp on the same GGUF file, written by llama.cpp's own quantizer.

llama-cpp-python (the `bench` extra, built from source) exposes llama.cpp's quantizer
(`llama_model_quantize`, as the `llama-quantize` tool runs it) and its inference. For each file type
of the usual presets, the embedded default model (trained, 4,096-piece vocabulary, dim 256) is
written as F32 GGUF by our save_model, quantized by llama.cpp, and run by both on 512 positions of
real text (the World English Bible): our `load_model(path)` (int8/int4 kernels) against llama.cpp's
logits. Its FFN width 704 is no multiple of 256, so llama.cpp stores ffn_down in a fallback type
(Q5_0, Q5_1, Q8_0 or IQ4_NL); a random model of FFN 512 checks the K-types on every matrix.
llama.cpp quantizes the activations too (to 8 bits, for its dot products), so even Q8_0 differs.

CI installs the extra and sets ANNOTATED_LLAMA_REQUIRE_LLAMA_CPP=1: there these tests fail
instead of skipping when llama_cpp cannot be imported.
"""

import ctypes
import lzma
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.default_model import default_model_dir
from annotated_llama.transforms.quantize import Int4Linear, Int8Linear
from annotated_llama.weights import load_model, save_model
from annotated_llama.weights.gguf import read_gguf

from fixtures import REPO

ROOT = REPO
# (llama.cpp file type, the bound on max |logit difference| / max |logit|): types whose values our
# kernels hold exactly or per row in int8 within 3%; the types re-fit into int4 (fit_int4) within 8%
TYPES = {"Q8_0": 0.03, "Q6_K": 0.03, "Q5_K_M": 0.03, "Q5_K_S": 0.03, "Q5_1": 0.03, "Q5_0": 0.03,
         "Q4_K_M": 0.03, "Q4_K_S": 0.03, "Q4_1": 0.03, "Q4_0": 0.03, "Q3_K_L": 0.08, "Q3_K_M": 0.08,
         "Q3_K_S": 0.08, "Q2_K": 0.08, "IQ4_NL": 0.08, "IQ4_XS": 0.08, "IQ3_S": 0.08, "IQ3_M": 0.08}


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("ANNOTATED_LLAMA_REQUIRE_LLAMA_CPP"):
            pytest.fail("llama_cpp is not importable, and ANNOTATED_LLAMA_REQUIRE_LLAMA_CPP is set (CI)")
        pytest.skip("llama-cpp-python (the bench extra) is not installed")
    return llama_cpp


def quantize(src: Path, name: str) -> Path:
    llama_cpp = llama_cpp_module()
    dst = src.with_name(src.name.replace("F32", name))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name), 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0, name
    return dst


def their_logits(path: Path, windows) -> np.ndarray:
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False)
    out = []
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
    return np.concatenate(out)


def our_logits(model, windows) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.tensor([ids]), cache=False)[0].numpy() for ids in windows])


@pytest.fixture(scope="module")
def default_f32(tmp_path_factory):
    """(the default model as an F32 GGUF, its tokenizer, two windows of 256 tokens of real text)."""
    llama_cpp_module()
    model, tok = load_model(default_model_dir(), dtype="float32")
    path = tmp_path_factory.mktemp("cpp") / "default-F32.gguf"
    save_model(model, tok, path, format="gguf", dtype="f32")
    text = lzma.open(ROOT / "data" / "world-english-bible.txt.xz").read().decode()[3_000_000:3_008_000]
    ids = tok.encode(text, bos=False, eos=False)
    windows = [[tok.bos_id] + ids[i * 255:(i + 1) * 255] for i in range(2)]
    return path, tok, windows


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_llama_cpp_quantized_files_agree_with_llama_cpp(default_f32, name):
    src, _, windows = default_f32
    path = quantize(src, name)
    types = sorted({t[0].name for t in read_gguf(path)[1].values()})
    model, _ = load_model(path)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds and {"Int8Linear", "Int8Embedding"} <= kinds  # no float matrix left
    theirs, ours = their_logits(path, windows), our_logits(model, windows)
    top1 = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"{name}: tensor types {types}; top-1 agreement {top1:.3f} over {len(ours)} positions, "
          f"max |logit difference| / max |logit| {rel:.4f}")
    assert top1 >= 0.95 and rel <= TYPES[name], (top1, rel)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS"])
def test_k_types_on_every_matrix(tmp_path, default_f32, name):
    # FFN 512: every row a multiple of 256, so llama.cpp stores every matrix in a K-type (no fallback)
    _, tok, windows = default_f32
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=tok.n_words, hidden_dim=512, max_seq_len=256)
    save_model(Transformer(args).eval(), tok, tmp_path / "rand-F32.gguf", format="gguf", dtype="f32")
    path = quantize(tmp_path / "rand-F32.gguf", name)
    types = {t[0].name for t in read_gguf(path)[1].values()} - {"F32"}
    assert types <= {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"}, types
    model, _ = load_model(path)
    theirs, ours = their_logits(path, windows[:1]), our_logits(model, windows[:1])
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    print(f"{name} (random weights, {sorted(types)}): max |logit difference| / max |logit| {rel:.4f}")
    assert rel <= 0.05


@pytest.mark.parametrize("dtype", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_llama_cpp_runs_our_quantized_gguf_with_our_greedy_tokens(tmp_path, default_f32, dtype):
    llama_cpp = llama_cpp_module()
    _, tok, _ = default_f32
    model, _ = load_model(default_model_dir(), dtype="float32")
    path = tmp_path / f"ours-{dtype}.gguf"
    save_model(model, tok, path, format="gguf", dtype=dtype)
    types = {t[0].name for t in read_gguf(path)[1].values()}
    assert types == {"F32", dtype.upper(), "Q8_0"}  # norms F32, the head Q8_0 (see gguf._encode)
    prompt = tok.encode("And God said, Let there be light", bos=True, eos=False)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
    theirs = []
    for t in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        theirs.append(t)
        if len(theirs) == 24:
            break
    ours, _ = load_model(path)  # the same file, into our kernels
    assert isinstance(ours.layers[0].attention.wq, Int4Linear if dtype.startswith("q4") else Int8Linear)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(ours(torch.tensor([ids]), cache=False)[0, -1].argmax()))
    assert ids[len(prompt):] == theirs


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
def test_a_tied_gguf_runs_in_llama_cpp(tmp_path, default_f32, dtype):
    # no output.weight in the file: llama.cpp uses token_embd as the head, as for Llama 3.2
    _, tok, windows = default_f32
    torch.manual_seed(0)
    args = ModelArgs(dim=256, n_layers=2, n_heads=4, vocab_size=tok.n_words, hidden_dim=512, max_seq_len=256,
                     tie_word_embeddings=True)
    model = Transformer(args).eval()
    path = tmp_path / f"tied-{dtype}.gguf"
    save_model(model, tok, path, format="gguf", dtype=dtype)
    assert "output.weight" not in read_gguf(path)[1]
    loaded, _ = load_model(path)
    table = getattr(loaded.tok_embeddings, "qweight", loaded.tok_embeddings.weight)  # int8 rows, or the float table
    assert loaded.params.tie_word_embeddings and loaded.output.weight is table
    theirs, ours = their_logits(path, windows[:1]), our_logits(loaded, windows[:1])
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert rel <= (1e-3 if dtype == "f32" else 0.03), rel
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.95
