"""Alpaca instruction data: load, validate, render, tokenize with a prompt mask, batch.

Taori et al. 2023 (stanford_alpaca): records {"instruction", "input", "output"} rendered with a fixed
template (chat_format.format_alpaca; tatsu-lab/stanford_alpaca train.py PROMPT_DICT). Three details decide whether a fine-tune stops
when it should (tloen/alpaca-lora issues #357, #367, #404...):
  - the target is `output` followed by EOS, so the model learns to end its answer;
  - the prompt's tokens get label -100 (PyTorch's cross-entropy ignore_index), so the model is not
    taught to write prompts ("### Instruction:" after its answer);
  - training and inference use the very same template string.
We tokenize the prompt and the output separately and concatenate: the prompt's ids are then exactly
the ids generation feeds (stanford_alpaca tokenizes prompt+output jointly and masks len(prompt ids),
which is the same whenever the boundary does not merge into one token).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.chat_format import format_alpaca

IGNORE_INDEX = -100  # stanford_alpaca's IGNORE_INDEX; F.cross_entropy's default ignore_index
FIELDS = ("instruction", "input", "output")


# ---- loading and validation -------------------------------------------------------------------

def load_records(path) -> list[dict]:
    """A JSON list of records (Alpaca's alpaca_data.json) or JSON Lines (one record per line).

    Every problem is a ValueError naming the file and where: malformed JSON by line and column,
    a bad record by its index (0-based, the position in the list / the record's line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: the data file is empty")
    if path.suffix != ".jsonl" and (text.lstrip().startswith("[") or "\n" not in text.strip()):
        try:  # one JSON document: a list of records
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        where = [f"record {i}" for i in range(len(data))]
    else:  # JSON Lines
        data, where = [], []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError as e:
                hint = " (a .json file must hold one JSON list)" if path.suffix == ".json" and lineno == 1 else ""
                raise ValueError(f"{path}: malformed JSON at line {lineno} column {e.colno}: {e.msg}{hint}") from None
            where.append(f"record {len(data) - 1} (line {lineno})")
    return [validate_record(r, f"{path}: {w}") for r, w in zip(data, where)]


def validate_record(record, where: str = "record") -> dict:
    """The record with `input` defaulted to "" (a missing input means none, as in Alpaca's data)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in ("instruction", "output"):
        if field not in record:
            raise ValueError(f"{where}: field {field!r} is missing")
    out = dict(record)
    out.setdefault("input", "")
    if out["input"] is None:
        out["input"] = ""
    for field in FIELDS:
        if not isinstance(out[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(out[field]).__name__}")
    if not out["instruction"].strip():
        raise ValueError(f"{where}: field 'instruction' is empty")
    return out


def render_prompt(record: dict) -> str:
    return format_alpaca(record["instruction"], record.get("input", ""))


# ---- tokenization with the prompt mask --------------------------------------------------------

@dataclass
class Example:
    ids: list[int]  # BOS + prompt + output + EOS (possibly cut)
    labels: list[int]  # IGNORE_INDEX over the prompt, the ids over the output
    cut: int  # tokens removed by truncation


def encode_record(tokenizer, record: dict, max_len: int | None = None) -> Example:
    prompt = tokenizer.encode(render_prompt(record), bos=True, eos=False)
    target = tokenizer.encode(record["output"], bos=False, eos=True)  # EOS ends every target
    ids = prompt + target
    labels = [IGNORE_INDEX] * len(prompt) + target
    cut = 0
    if max_len is not None and len(ids) > max_len:
        # Cut the end. A cut target keeps no EOS: teaching the model to stop mid-answer would be
        # worse than not teaching it to stop on this one record.
        cut = len(ids) - max_len
        ids, labels = ids[:max_len], labels[:max_len]
    return Example(ids, labels, cut)


@dataclass
class Dataset:
    examples: list[Example]
    n_truncated: int = 0  # records that lost tokens
    n_cut_tokens: int = 0
    n_dropped: int = 0  # records with no output token left after the cut (nothing to learn)

    def summary(self) -> str:
        return (f"{len(self.examples)} examples, {self.n_truncated} truncated ({self.n_cut_tokens} tokens cut), "
                f"{self.n_dropped} dropped (prompt alone reaches the max length)")


def build_dataset(tokenizer, records: list[dict], max_len: int) -> Dataset:
    if max_len < 2:
        raise ValueError(f"max length must be at least 2 tokens, got {max_len}")
    ds = Dataset([])
    for r in records:
        ex = encode_record(tokenizer, r, max_len)
        if all(label == IGNORE_INDEX for label in ex.labels[1:]):
            ds.n_dropped += 1
            continue
        if ex.cut:
            ds.n_truncated += 1
            ds.n_cut_tokens += ex.cut
        ds.examples.append(ex)
    return ds


# ---- batches ----------------------------------------------------------------------------------

def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example and shift by one: (inputs[B,T], targets[B,T]).

    targets[b, t] is the token after inputs[b, t], or IGNORE_INDEX (prompt, padding). The pad id
    in inputs is never learned from (its target is ignored) and, padding on the right, never
    attended to by a real token under the causal mask."""
    T = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[b, :n] = torch.tensor(e.ids[:-1])
        targets[b, :n] = torch.tensor(e.labels[1:])
    return inputs, targets


class Batches:
    """Micro-batch i as a pure function of i (so the shared loop resumes exactly): the examples
    are shuffled once per epoch by random.Random(seed, epoch), then taken batch_size at a time."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, pad_id: int):
        if not dataset.examples:
            raise ValueError("no training examples left (all dropped by the max length?)")
        self.examples, self.batch_size, self.seed, self.pad_id = dataset.examples, batch_size, seed, pad_id
        self.per_epoch = max(1, len(self.examples) // batch_size)  # the ragged tail is dropped
        self._orders: dict[int, list[int]] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.examples)))
            random.Random(f"{self.seed}-{epoch}").shuffle(idx)
            self._orders = {epoch: idx}  # keep one epoch's order
        return self._orders[epoch]

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(i, self.per_epoch)
        idx = self.order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        if len(idx) < self.batch_size:  # fewer examples than one batch: wrap around
            idx = (idx * self.batch_size)[:self.batch_size]
        return collate([self.examples[k] for k in idx], self.pad_id)
