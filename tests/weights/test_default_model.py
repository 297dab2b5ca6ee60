"""The embedded default model: it loads, generates English from the Bible, and the validation
perplexity stored beside it (eval.json) is reproduced by `annotated-llama evaluate` within 1%."""

import json
import re
from pathlib import Path

import pytest
import torch

from annotated_llama import ModelArgs, Tokenizer, load_model
from annotated_llama.default_model import default_model_dir
from annotated_llama.data.pretokenize import check_tokenizer, pretokenize

from fixtures import REPO, cli

CORPUS = REPO / "data/world-english-bible.txt.xz"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return default_model_dir()


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = load_model(model_dir)
    return model.float().eval(), tok


def test_files_are_small_and_complete(model_dir):
    sizes = {p.name: p.stat().st_size for p in model_dir.iterdir() if p.is_file()}
    assert {"params.json", "model.safetensors", "tokenizer.model", "eval.json"} <= set(sizes)
    assert sum(sizes.values()) < 30e6
    args = ModelArgs.from_params_json(model_dir / "params.json")
    assert args == ModelArgs.from_name("bible-7m")  # the preset it was trained with
    assert Tokenizer(model_dir / "tokenizer.model").n_words == args.vocab_size == 4096


@pytest.fixture(scope="module")
def bible_words() -> set:
    import lzma
    return set(re.findall(r"[A-Za-z]+", lzma.open(CORPUS, "rt", encoding="utf-8").read()))


def test_generates_scripture_like_english(loaded, bible_words):
    model, tok = loaded
    prompt = tok.encode("In the beginning", bos=True, eos=False)
    ids = list(prompt)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))  # prefill through the KV cache
        for _ in range(40):  # greedy
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[ids[-1]]]), start_pos=len(ids) - 1)
        full = model(torch.tensor([ids[:-1]]), cache=False)  # the same tokens without the cache
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == ids[len(prompt):]
    text = tok.decode(ids[len(prompt):])
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 15, text
    assert sum(w in bible_words for w in words) >= 0.9 * len(words), text  # real words, not piece soup


@pytest.mark.slow
def test_stored_perplexity_is_reproduced(model_dir, tmp_path):
    stored = json.loads((model_dir / "eval.json").read_text())
    shards = tmp_path / "shards"
    pretokenize([CORPUS], model_dir / "tokenizer.model", shards, val_every=40, progress=False)
    check_tokenizer(shards, model_dir / "tokenizer.model", 4096)
    got = json.loads(cli("evaluate", "--data", shards, "--seq-len", stored["seq_len"],
                         "--max-windows", stored["windows"]).stdout)  # no --model: the embedded one
    assert got["tokens"] == stored["tokens"]
    assert got["val_ppl"] == pytest.approx(stored["val_ppl"], rel=0.01)
    assert 1 < stored["val_ppl"] < 100  # it learned something: chance is 4096
