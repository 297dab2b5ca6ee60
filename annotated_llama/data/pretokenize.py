"""Text to token shards, and random fixed-length windows drawn from them.

The corpus is cut into documents (a paragraph, with a chapter heading joined to the text that
follows it; an over-long paragraph cut at sentence ends). A document goes to the validation
split when its index is `VAL_OFFSET` modulo `val_every`: whole documents are held out, so no
validation window shares text with a training window, and the split is a pure function of the
corpus (no RNG). Each document is encoded as `<s> text </s>` and the documents are
concatenated, as LLaMA trains on packed sequences (paper 2.1: "the entire training dataset
contains roughly 1.4T tokens after tokenization").

On disk, `OUT/train.bin` and `OUT/val.bin` hold the token ids as raw uint16 (or uint32 when the
vocabulary has more than 65,536 pieces), read back through `numpy.memmap` so a corpus larger
than memory costs nothing to open; `OUT/meta.json` records the dtype, counts and the
tokenizer's SHA-256 so a shard dir is never used with another tokenizer.

Batches: `WindowSampler` draws B windows of T+1 tokens at offsets that are a pure function of
(seed, step, rank), so resuming needs only the step number, and each rank of a data-parallel
run reads its own share (the global batch is the ranks' rows side by side).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.tokenizer import Tokenizer

VAL_OFFSET = 7  # which residue of the document index goes to validation
MAX_DOC_CHARS = 4000  # longer paragraphs are cut at sentence ends
_SENTENCE_END = re.compile(r"(?<=[.?!;:’”])\s+")


def read_corpus(paths) -> str:
    """The concatenated text of `paths`, with clear errors for missing or empty files."""
    if not paths:
        raise ValueError("no corpus files given")
    texts = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: corpus file not found")
        try:
            if p.suffix == ".xz":
                with lzma.open(p) as f:
                    data = f.read()
            else:
                data = p.read_bytes()
        except (OSError, EOFError, lzma.LZMAError) as e:  # unreadable, truncated or not xz at all
            raise ValueError(f"{p}: cannot read the corpus file ({e})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start:,}"
                             f"{' of the decompressed text' if p.suffix == '.xz' else ''})") from None
        if not text.strip():
            raise ValueError(f"{p}: corpus file is empty")
        texts.append(text)
    return "\n".join(texts)


def split_long(paragraph: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a paragraph into pieces of at most ~max_chars, at sentence ends."""
    if len(paragraph) <= max_chars:
        return [paragraph]
    pieces, current = [], ""
    for sentence in _SENTENCE_END.split(paragraph):
        if current and len(current) + 1 + len(sentence) > max_chars:
            pieces.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        pieces.append(current)
    return pieces


def documents(text: str) -> list[str]:
    """Paragraphs; a short heading line ("Genesis 1") is kept with the paragraph after it."""
    docs, heading = [], None
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if len(line) < 40 and not line.endswith((".", "?", "!", "”", "’")):
            heading = line if heading is None else f"{heading}\n\n{line}"
            continue
        pieces = split_long(line)
        if heading is not None:
            pieces[0] = f"{heading}\n\n{pieces[0]}"
            heading = None
        docs.extend(pieces)
    if heading is not None:
        docs.append(heading)
    return docs


def split_train_val(docs: list[str], val_every: int) -> tuple[list[str], list[str]]:
    if val_every < 2:
        raise ValueError(f"--val-every must be at least 2, got {val_every}")
    train = [d for i, d in enumerate(docs) if i % val_every != VAL_OFFSET % val_every]
    val = [d for i, d in enumerate(docs) if i % val_every == VAL_OFFSET % val_every]
    return train, val


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_tokens(path: Path, ids: np.ndarray):
    # temporary name, fsync, rename: a killed run never leaves a half-written shard behind
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(ids.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pretokenize(corpora, tokenizer_path, out_dir, val_every: int = 40, progress: bool = True) -> dict:
    """Encode `corpora` with the tokenizer at `tokenizer_path` into OUT/{train,val}.bin + meta.json."""
    tok = Tokenizer(tokenizer_path)
    docs = documents(read_corpus(corpora))
    train_docs, val_docs = split_train_val(docs, val_every)
    if not val_docs or not train_docs:
        raise ValueError(f"corpus has only {len(docs)} documents: too few for a train/validation split "
                         f"holding out 1 in {val_every}")
    dtype = np.uint16 if tok.n_words <= 2 ** 16 else np.uint32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = []
        for d in tqdm(split_docs, desc=f"tokenizing {split}", unit="doc", disable=not progress):
            ids.extend(tok.encode(d, bos=True, eos=True))
        _write_tokens(out / f"{split}.bin", np.asarray(ids, dtype=dtype))
        counts[split] = len(ids)
    meta = {"vocab_size": tok.n_words, "dtype": np.dtype(dtype).name, "tokenizer_sha256": file_sha256(tokenizer_path),
            "train_tokens": counts["train"], "val_tokens": counts["val"], "train_documents": len(train_docs),
            "val_documents": len(val_docs), "val_every": val_every, "val_offset": VAL_OFFSET,
            "corpora": [Path(c).name for c in corpora]}
    if Path(tokenizer_path).resolve() != (out / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_path, out / "tokenizer.model.tmp")
        os.replace(out / "tokenizer.model.tmp", out / "tokenizer.model")  # pretrain finds it here
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, out / "meta.json")
    return meta


def read_shard_meta(data_dir) -> dict:
    d = Path(data_dir)
    if not (d / "meta.json").is_file():
        raise FileNotFoundError(f"{d}: not a token shard dir (meta.json missing; run `annotated-llama pretokenize`)")
    return json.loads((d / "meta.json").read_text())


def check_tokenizer(data_dir, tokenizer_path, vocab_size: int):
    """Refuse a shard dir made with another tokenizer (ids would mean other pieces)."""
    meta = read_shard_meta(data_dir)
    if meta["vocab_size"] != vocab_size:
        raise ValueError(f"{data_dir}: shards were made with a {meta['vocab_size']}-piece vocabulary, "
                         f"but the model/tokenizer has {vocab_size}")
    if tokenizer_path is not None and meta.get("tokenizer_sha256") != file_sha256(tokenizer_path):
        raise ValueError(f"{data_dir}: shards were made with another tokenizer than {tokenizer_path}")


def open_tokens(data_dir, split: str) -> np.ndarray:
    meta = read_shard_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard missing")
    return np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")


class WindowSampler:
    """Batches of random windows: `sampler(step) -> (inputs[B,T], targets[B,T])`.

    Rank r of W takes rows [r*B, (r+1)*B) of the global batch of W*B windows for that step,
    so W processes with B rows each see exactly the windows that one process with W*B rows sees.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(tokens) < seq_len + 2:
            raise ValueError(f"only {len(tokens)} tokens: too few for windows of {seq_len}+1")
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.T - 1, (self.world_size * self.B,), generator=g)
        starts = starts[self.rank * self.B:(self.rank + 1) * self.B].tolist()
        rows = np.stack([np.asarray(self.tokens[s:s + self.T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]  # inputs (B, T), targets (B, T): next-token prediction


def fixed_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None):
    """Consecutive non-overlapping windows from the start (evaluation): yields (inputs[1,T], targets[1,T])."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    for i in range(n):
        row = torch.from_numpy(np.asarray(tokens[i * seq_len:(i + 1) * seq_len + 1], dtype=np.int64))
        yield row[None, :-1], row[None, 1:]
