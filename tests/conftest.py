import lzma
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


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
    """The device of tests/test_device.py: env ANNOTATED_LLAMA_TEST_DEVICE (default "cpu";
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
