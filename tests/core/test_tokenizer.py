"""Tokenizers against llama.cpp's golden cases and SentencePiece itself."""

import random

import pytest
import sentencepiece as spm

from annotated_llama import Tokenizer
from fixtures import DATA

from fixtures import golden_cases, random_strings


def test_llama_spm_golden_cases(spm_path):
    tok = Tokenizer(spm_path)
    for text, expected in golden_cases("llama-spm"):
        assert tok.encode(text, bos=False, eos=False) == expected, repr(text)


def test_llama_spm_gguf_golden_cases():
    tok = Tokenizer(DATA / "llama-spm.gguf")
    for text, expected in golden_cases("llama-spm"):
        assert tok.encode(text, bos=False, eos=False) == expected, repr(text)


def test_llama3_bpe_golden_cases(llama3_tokenizer):
    tok = llama3_tokenizer
    for text, expected in golden_cases("llama3-bpe"):
        assert tok.encode(text, bos=False, eos=False) == expected, repr(text)


def test_metas_example_prompt(spm_path):
    tok = Tokenizer(spm_path)
    assert tok.encode("I believe the meaning of life is", bos=True, eos=False) == [1, 306, 4658, 278, 6593, 310, 2834, 338]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 32000)
    assert tok.stop_ids == {2}
    assert tok.encode("x", bos=True, eos=True)[-1] == 2


def test_llama3_special_ids(llama3_tokenizer):
    tok = llama3_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (128000, 128001, -1, 128256)
    assert tok.special_id("<|start_header_id|>") == 128006
    assert tok.special_id("<|end_header_id|>") == 128007
    assert tok.special_id("<|eot_id|>") == 128009
    assert tok.stop_ids == {128001, 128009}
    # special-token text typed by a user is plain text, never the special id
    assert 128009 not in tok.encode("<|eot_id|>", bos=False, eos=False)


def test_sentencepiece_model_and_gguf_agree(spm_path):
    a, b = Tokenizer(spm_path), Tokenizer(DATA / "llama-spm.gguf")
    reference = spm.SentencePieceProcessor(model_file=str(spm_path))
    rng = random.Random(1)
    for s in random_strings(rng, 500):
        ids = a.encode(s, bos=True, eos=False)
        assert ids == b.encode(s, bos=True, eos=False) == [1] + reference.encode(s), repr(s)


def test_llama3_tiktoken_file_equals_gguf(llama3_tokenizer, tmp_path):
    # Meta's Llama 3 tokenizer.model format (base64 piece, rank) written from the GGUF vocabulary.
    from_gguf = llama3_tokenizer
    path = tmp_path / "tokenizer.model"
    path.write_bytes(from_gguf.model_bytes())
    from_model = Tokenizer(path)
    # a bare tiktoken file names its specials as Llama 3.1 does: <|eom_id|> (128008) also stops
    assert from_model.n_words == 128256 and from_model.stop_ids == {128001, 128008, 128009}
    rng = random.Random(2)
    for s in random_strings(rng, 300):
        assert from_model.encode(s, bos=True, eos=True) == from_gguf.encode(s, bos=True, eos=True)


@pytest.mark.parametrize("which", ["spm", "llama3"])
def test_decode_inverts_encode(which, spm_path, llama3_tokenizer):
    rng = random.Random(3)
    if which == "spm":  # SentencePiece drops control pieces (<s>, </s>) when decoding
        tok, bos = Tokenizer(spm_path), True
    else:  # Meta's Llama 3 decode spells special tokens out, so round-trip the text alone
        tok, bos = llama3_tokenizer, False
    for s in random_strings(rng, 2000):
        assert tok.decode(tok.encode(s, bos=bos, eos=bos)) == s, repr(s)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model: tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ValueError, match="bad.model: not a SentencePiece"):
        Tokenizer(bad)
    badgguf = tmp_path / "bad.gguf"
    badgguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(ValueError, match="bad.gguf"):
        Tokenizer(badgguf)
    badtt = tmp_path / "tt.model"
    badtt.write_bytes(b"IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match="tt.model: line 2"):
        Tokenizer(badtt)


def test_gguf_metadata_reader_agrees_with_gguf_package():
    import numpy as np
    from gguf import GGUFReader

    from annotated_llama.core.gguf_file import read_gguf

    path = DATA / "llama-spm.gguf"
    ours = read_gguf(path.read_bytes(), vocabulary=True, tensors=False)[0]
    fields = {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}
    assert ours.keys() == fields.keys()
    for key, value in fields.items():
        if key == "tokenizer.ggml.scores":
            np.testing.assert_array_equal(np.float32(ours[key]), np.float32(value))
        else:
            assert ours[key] == value, key
    with pytest.raises(ValueError, match="truncated|unpack"):
        read_gguf(path.read_bytes()[:5000], vocabulary=True, tensors=False)[0]
