"""`annotated-llama info`: one screen of facts from metadata and tensor headers only."""

import contextlib
import io
import json
import shutil
import struct

import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.__main__ import main
from annotated_llama.weights import load_model, save_model
from annotated_llama.core.layout import META_TO_HF, rename
from fixtures import DATA, tiny_model


def info(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["info", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


def info_json(path):
    rc, out, err = info(path, "--json")
    assert rc == 0, err
    return json.loads(out)


def header_only_hf_dir(path, args, dtype="BF16"):
    """An HF dir whose model.safetensors has the full header of `args` but no tensor data at all:
    info must describe it without reading any weight (loading it fails)."""
    with torch.device("meta"):
        names = {k: list(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        del names["output.weight"]
    header, offset = {}, 0
    for name, shape in names.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[rename(name, META_TO_HF)] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    (path / "config.json").write_text(json.dumps(args.to_hf_config(128000, 128001, "bfloat16")))
    return offset


def test_a_llama_32_1b_snapshot_from_its_header_alone(tmp_path, llama3_tokenizer_json):
    args = ModelArgs.from_name("llama-3.2-1b")
    d = tmp_path / "models--meta-llama--Llama-3.2-1B-Instruct" / "snapshots" / "9213176"
    data_bytes = header_only_hf_dir(d, args)
    shutil.copy(llama3_tokenizer_json, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": (DATA / "chat_templates" / "llama-3.1-instruct.jinja").read_text()}))
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                          "eos_token_id": [128001, 128008, 128009]}))
    got = info_json(d)
    assert got["format"] == "HF, a Hub snapshot"
    assert got["preset"] == ["llama-3.2-1b"]
    assert got["parameters"] == 1_235_814_400 and data_bytes == 2 * 1_235_814_400  # the header's shapes agree
    assert got["tensors"] == {"BF16": 2 + 16 * 9}  # embedding, final norm, 9 per layer; no lm_head
    assert got["file_bytes"] < 100_000  # no data in the file at all
    assert got["architecture"]["tie_word_embeddings"] and got["context_length"] == 131072
    assert got["rope"] == {"theta": 500000.0, "scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_context": 8192}}
    assert got["tokenizer"]["kind"] == "tokenizers" and got["tokenizer"]["stop_ids"] == [128001, 128008, 128009]
    assert got["chat_template"] == {"name": "model", "first_line": "{{- bos_token }}"}
    assert got["generation_defaults"] == {"temperature": 0.6, "top_p": 0.9}
    weights = got["memory"]["weights_bytes"]
    assert weights["bf16"] == 2 * 1_235_814_400 and weights["f32"] == 4 * 1_235_814_400
    assert weights["int4"] < weights["int8"] < weights["bf16"]
    # 16 layers x 8 kv heads x 64 dims x (K and V) x 1024 tokens x 2 bytes
    assert got["memory"]["kv_cache_bytes_per_1k_tokens"]["bf16"] == 16 * 8 * 64 * 2 * 1024 * 2 == 32 * 2**20
    rc, text, _ = info(d)
    assert rc == 0 and len(text.splitlines()) <= 16  # one screen
    assert "preset        llama-3.2-1b" in text and "1,235,814,400" in text and "tied embeddings" in text
    with pytest.raises(ValueError):  # and it really holds no weights: loading it fails
        load_model(d)


def tiny_tied():
    return tiny_model(0, "tiny-llama3", tie_word_embeddings=True)


@pytest.mark.parametrize("fmt", ["meta", "ours", "hf"])
def test_each_layout(tmp_path, fmt):
    model = tiny_tied()
    save_model(model, None, tmp_path / fmt, format=fmt, dtype="bf16")
    got = info_json(tmp_path / fmt)
    loaded, _ = load_model(tmp_path / fmt)
    assert got["parameters"] == sum(p.numel() for p in loaded.parameters()) == model.params.num_params()
    assert got["architecture"]["tie_word_embeddings"] and got["preset"] == []
    assert got["format"].lower().startswith({"meta": "meta", "ours": "ours", "hf": "hf"}[fmt])
    assert set(got["tensors"]) == {"bfloat16" if fmt == "meta" else "BF16"}
    assert got["tokenizer"] is None


def test_gguf_and_quantized(tmp_path, spm_path):
    from annotated_llama import Tokenizer
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32))
    tok = Tokenizer(spm_path)
    save_model(model, tok, tmp_path / "m.gguf", format="gguf", dtype="q8_0")
    got = info_json(tmp_path / "m.gguf")
    assert got["format"].startswith("GGUF") and got["parameters"] == model.params.num_params()
    assert got["tensors"]["Q8_0"] == 2 * 7 + 2 and got["tensors"]["F32"] == 2 * 2 + 1  # norms stay F32
    assert got["tokenizer"]["kind"] == "sentencepiece" and got["chat_template"]["name"] == "llama-2"
    save_model(model, tok, tmp_path / "ours", format="ours")
    assert main(["quantize", str(tmp_path / "ours"), str(tmp_path / "q8"), "--mode", "int8"]) == 0
    got = info_json(tmp_path / "q8")
    assert got["format"] == "ours (params.json + model.safetensors, int8 weights)"
    assert got["parameters"] == model.params.num_params() and "I8" in got["tensors"]


def test_bad_paths_are_one_line_errors(tmp_path):
    cases = [(tmp_path / "missing", "no such file or directory")]
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append((empty, "no weights found"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps(ModelArgs.from_name("tiny").to_hf_config()))
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)
    cases.append((broken, "model.safetensors: not a valid safetensors file"))
    cases.append((DATA / "llama-spm.gguf", "a vocabulary-only GGUF"))
    notjson = tmp_path / "notjson"
    notjson.mkdir()
    (notjson / "config.json").write_text("{")
    cases.append((notjson, "config.json"))
    for path, needle in cases:
        rc, out, err = info(path)
        assert rc == 2 and not out and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert needle in err, (needle, err)
