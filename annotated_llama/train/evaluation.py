"""Validation loss and perplexity of a model on token shards or on a text file.

Perplexity is exp(mean next-token cross-entropy), the mean taken over every predicted token
(not over windows), so it does not depend on how the tokens are cut into windows of equal length.
Windows are consecutive and non-overlapping from the start of the split: a fixed slice, so the
figure stored beside the default model (eval.json) is reproduced exactly by `evaluate`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.pretokenize import check_tokenizer, documents, fixed_windows, open_tokens, read_corpus

EVAL_SEQ_LEN = 256
EVAL_WINDOWS = 32  # 8,192 tokens: a fast, fixed slice (the test reproduces it within 1%)


@torch.no_grad()
def mean_token_loss(model, windows) -> tuple[float, int, int]:
    """(mean loss per predicted token, tokens, windows) over (inputs[1,T], targets[1,T]) pairs."""
    total, count, n = 0.0, 0, 0
    for inputs, targets in windows:
        logits = model(inputs, cache=False)  # (1, T, V) float32
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        count += targets.numel()
        n += 1
    if count == 0:
        raise ValueError("no evaluation windows: the data is shorter than one window (try a smaller --seq-len)")
    return total / count, count, n


def evaluate_model(model, data, tokenizer=None, seq_len: int = EVAL_SEQ_LEN, max_windows=EVAL_WINDOWS,
                   split: str = "val") -> dict:
    """`data` is a shard dir (its `split`) or a text file (encoded whole, <s> text </s> per document)."""
    data = Path(data)
    if data.is_dir():
        tok_path = getattr(tokenizer, "path", None)
        check_tokenizer(data, tok_path, model.params.vocab_size)
        tokens = open_tokens(data, split)
    elif data.is_file():
        if tokenizer is None:
            raise ValueError(f"{data}: evaluating a text file needs the model's tokenizer")
        ids = [i for d in documents(read_corpus([data])) for i in tokenizer.encode(d, bos=True, eos=True)]
        tokens = np.asarray(ids, dtype=np.int64)
    else:
        raise FileNotFoundError(f"{data}: no such shard dir or text file")
    if seq_len > model.params.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_seq_len {model.params.max_seq_len}")
    loss, count, n = mean_token_loss(model, fixed_windows(tokens, seq_len, max_windows))
    return {"val_loss": loss, "val_ppl": math.exp(loss), "tokens": count, "windows": n, "seq_len": seq_len}
