import json
import lzma
import os
from pathlib import Path

import pytest
import torch

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama.data import pretokenize as tdata
from annotated_llama.data.alpaca import render_prompt
from fixtures import RECORDS, REPO, TINY, FileServer

DATA = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The tests use tiny models, for which a second intra-op thread only adds synchronisation
    # (20-30x slower steps were seen on a loaded 2-core machine). Subprocesses choose their own.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def server():
    """A local HTTP server that drops, stalls, lies and attacks on request (fixtures.FileServer)."""
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(scope="session")
def spm_path() -> Path:
    """LLaMA 1/2's SentencePiece vocabulary (32,000 pieces)."""
    return DATA / "llama-spm.model"


@pytest.fixture(scope="session")
def llama3_gguf_path(tmp_path_factory) -> Path:
    """Llama 3's BPE vocabulary as llama.cpp's vocab-only GGUF (stored xz-compressed)."""
    out = tmp_path_factory.mktemp("llama3") / "llama3-bpe.gguf"
    out.write_bytes(lzma.open(DATA / "llama3-bpe.gguf.xz").read())
    return out


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_gguf_path):
    # gguf's GGUFReader takes seconds to parse 280k merges: load once per session.
    from annotated_llama import Tokenizer
    return Tokenizer(llama3_gguf_path)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device of tests/inference/test_device.py: env ANNOTATED_LLAMA_TEST_DEVICE (default "cpu";
    "cuda" on a GPU machine, see bench/gpu_check.sh). A device that is not there fails the tests."""
    name = os.environ.get("ANNOTATED_LLAMA_TEST_DEVICE", "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        pytest.fail(f"ANNOTATED_LLAMA_TEST_DEVICE={name!r}: not a torch device ({e})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.fail(f"ANNOTATED_LLAMA_TEST_DEVICE={name!r}: no CUDA device is visible")
        # float32 means float32: no TF32 matmuls (PyTorch's default, stated in case the environment changed it)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    elif dev.type != "cpu":
        pytest.fail(f"ANNOTATED_LLAMA_TEST_DEVICE={name!r}: only cpu and cuda are tested")
    return dev


@pytest.fixture(scope="session")
def llama3_tokenizer_json(tmp_path_factory, llama3_tokenizer) -> Path:
    """Llama 3's vocabulary as a Hub tokenizer.json (byte-level BPE, Llama 3's split regex, merges
    ranked as tiktoken ranks them, BOS added by the post-processor), written by weights/hf.py."""
    from annotated_llama.weights.hf import tokenizer_json

    out = tmp_path_factory.mktemp("llama3-json") / "tokenizer.json"
    out.write_text(tokenizer_json(llama3_tokenizer))
    return out


@pytest.fixture(scope="session")
def llama2_tokenizer_json(tmp_path_factory, spm_path) -> Path:
    """LLaMA's SentencePiece vocabulary as transformers' own converter writes tokenizer.json
    (SentencePiece-style BPE with byte fallback; a Llama 2 snapshot that ships no tokenizer.model)."""
    import transformers

    src = tmp_path_factory.mktemp("llama2-src")
    (src / "tokenizer.model").write_bytes(spm_path.read_bytes())
    out = tmp_path_factory.mktemp("llama2-json")
    transformers.LlamaTokenizer.from_pretrained(src).save_pretrained(out)
    for extra in set(p.name for p in out.iterdir()) - {"tokenizer.json"}:
        (out / extra).unlink()  # only the vocabulary: each test writes the config it needs
    return out / "tokenizer.json"


# ---- tiny tokenizers, corpora, shards and models shared by the training tests --------------

@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """A 400-piece SentencePiece BPE trained in a second on the templates and records above."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tok")
    lines = [render_prompt(r) + " " + r["output"] for r in RECORDS] * 20
    lines += ["In the beginning, God created the heavens and the earth. Which book, how many words?"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2, num_threads=1)
    return d / "tokenizer.model"


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tiny_tokenizer_path):
    from annotated_llama.weights import save_model

    tok = Tokenizer(tiny_tokenizer_path)
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=tok.n_words, max_seq_len=128))
    out = tmp_path_factory.mktemp("base") / "model"
    save_model(model, tok, out, format="ours")
    return out


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The first ~120 kB of the World English Bible copy in the repo (Genesis)."""
    text = lzma.open(REPO / "data/world-english-bible.txt.xz", "rt", encoding="utf-8").read(120_000)
    path = tmp_path_factory.mktemp("corpus") / "genesis.txt"
    path.write_text(text[:text.rfind("\n")] + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_path(corpus, tmp_path_factory) -> Path:
    from annotated_llama.train.tokenizer_training import train_tokenizer
    return train_tokenizer([corpus], 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def shards(corpus, tokenizer_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    tdata.pretokenize([corpus], tokenizer_path, out, val_every=8, progress=False)
    return out


@pytest.fixture(scope="session")
def params_json(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("params") / "params.json"
    p.write_text(json.dumps(TINY))
    return p
