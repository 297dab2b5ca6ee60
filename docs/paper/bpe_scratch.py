"""Byte-pair encoding from scratch, the way LLaMA's SentencePiece tokenizer does it.

The companion module of docs/paper/03_tokenizer.md; written for reading, not for speed (pure Python,
quadratic in the length of the text). Nothing here comes from sentencepiece: the chapter checks that
`encode` with LLaMA's pieces and scores gives exactly the ids sentencepiece gives.

- BPE (Gage 1994; Sennrich et al. 2016, https://arxiv.org/abs/1508.07909): start from characters and
  repeatedly merge the most frequent adjacent pair into a new symbol; the merges, in order, are the model.
- SentencePiece (Kudo & Richardson 2018, https://arxiv.org/abs/1808.06226) treats the text as one stream:
  spaces become the visible symbol U+2581 "▁" and a "▁" is put in front (the dummy prefix), so "Hello world"
  is "▁Hello▁world" and decoding is lossless. Each piece carries a score; encoding merges, at every step,
  the adjacent pair whose concatenation is the piece of highest score (the earliest merge learned).
- LLaMA's settings (paper section 2.1): numbers split into single digits, and characters missing from the
  vocabulary are written as their UTF-8 bytes, `<0xE2>`-style pieces ("byte fallback"), so nothing is <unk>.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

SPACE = "\u2581"  # "▁": SentencePiece's visible space
SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 as in LLaMA
BYTE_PIECES = [f"<0x{b:02X}>" for b in range(256)]  # ids 3..258 as in LLaMA


@dataclass
class Vocab:
    """A SentencePiece-style BPE vocabulary: id -> piece, its score, and whether it may appear in text.

    `normal[i]` is False for <unk>, the control pieces <s> </s>, and the byte pieces: those never result
    from merging characters (the text "<s>" is three characters, not the start-of-sequence id)."""
    pieces: list[str]
    scores: list[float]
    normal: list[bool]
    byte_fallback: bool = True
    unk_id: int = 0
    index: dict[str, int] = field(init=False, repr=False)  # normal piece -> id
    byte_ids: dict[int, int] = field(init=False, repr=False)  # byte value -> id of its <0xXX> piece

    def __post_init__(self):
        self.index = {p: i for i, p in enumerate(self.pieces) if self.normal[i]}
        self.byte_ids = {int(p[3:5], 16): i for i, p in enumerate(self.pieces) if p in BYTE_PIECES}


# ---- encoding ------------------------------------------------------------------------------------

def normalize(text: str) -> str:
    # LLaMA's normalizer: no Unicode rewriting ("identity"), spaces kept (even runs of them) and made
    # visible, and a dummy prefix so that a word is the same piece at the start of a text and after a space.
    return SPACE + text.replace(" ", SPACE)


def merge_symbols(symbols: list[str], vocab: Vocab) -> list[str]:
    """Merge adjacent symbols while any adjacent pair forms a piece; always the pair of highest score
    (ties: the leftmost). This is SentencePiece's BPE encoding; with scores = -(merge rank) it is the
    same as replaying the learned merges in order."""
    symbols = list(symbols)
    while True:
        best, best_score = None, None
        for i in range(len(symbols) - 1):
            piece_id = vocab.index.get(symbols[i] + symbols[i + 1])
            if piece_id is not None and (best_score is None or vocab.scores[piece_id] > best_score):
                best, best_score = i, vocab.scores[piece_id]
        if best is None:
            return symbols
        symbols[best:best + 2] = [symbols[best] + symbols[best + 1]]


def encode(text: str, vocab: Vocab) -> list[int]:
    if not text:
        return []
    ids = []
    for symbol in merge_symbols(list(normalize(text)), vocab):
        if symbol in vocab.index:
            ids.append(vocab.index[symbol])
        elif vocab.byte_fallback:  # a character the vocabulary lacks: its UTF-8 bytes
            ids.extend(vocab.byte_ids[b] for b in symbol.encode("utf-8"))
        else:
            ids.append(vocab.unk_id)
    return ids


def decode(ids: list[int], vocab: Vocab) -> str:
    out, pending = [], bytearray()  # byte pieces are collected until they form characters
    for i in ids:
        piece = vocab.pieces[i]
        if piece in BYTE_PIECES:
            pending.append(int(piece[3:5], 16))
            continue
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        if vocab.normal[i]:
            out.append(piece.replace(SPACE, " "))
    if pending:
        out.append(pending.decode("utf-8", errors="replace"))
    text = "".join(out)
    return text[1:] if text.startswith(" ") else text  # drop the dummy prefix


# ---- training ------------------------------------------------------------------------------------

def count_words(text: str) -> Counter:
    # Merges never cross a space (a piece may start with "▁" but not contain one in the middle), so the
    # corpus is a bag of "▁word" strings with counts: each distinct word is processed once.
    return Counter(normalize(w) for w in text.split())


def mergeable(a: str, b: str, split_digits: bool) -> bool:
    # LLaMA splits all numbers into digits: a digit never joins anything, so no piece holds a digit
    # next to another symbol and "1989" is always four pieces.
    if split_digits and any(ch.isdigit() for ch in a + b):
        return False
    return not b.startswith(SPACE)  # "▁" only at the start of a piece


def train(text: str, vocab_size: int, split_digits: bool = True) -> tuple[Vocab, list[tuple[str, str]]]:
    """Learn a BPE vocabulary of `vocab_size` pieces from `text`. Returns (vocab, merges in order).

    Layout as in LLaMA's vocabulary: <unk> <s> </s>, the 256 byte pieces, the merged pieces (the earliest
    merge has the highest score), then the single characters of the alphabet."""
    words = count_words(text)
    alphabet = sorted({ch for w in words for ch in w})
    n_merges = vocab_size - len(SPECIALS) - len(BYTE_PIECES) - len(alphabet)
    if n_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {vocab_size - n_merges} "
                         "special, byte and character pieces")
    split = {w: list(w) for w in words}  # each word as its current symbols
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, count in words.items():
            s = split[w]
            for a, b in zip(s, s[1:]):
                if mergeable(a, b, split_digits):
                    pairs[a, b] += count
        if not pairs:
            break  # every word is a single symbol: nothing left to merge
        # the most frequent pair; ties broken by the pair itself, so training is deterministic
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        for w in words:
            split[w] = _merge_pair(split[w], a, b)

    merged = list(dict.fromkeys(a + b for a, b in merges))  # ("▁t","he") and ("▁th","e") make one piece
    pieces = SPECIALS + BYTE_PIECES + merged + alphabet
    n_fixed = len(SPECIALS) + len(BYTE_PIECES)
    scores = [0.0] * n_fixed + [-float(r) for r in range(len(merged) + len(alphabet))]
    normal = [False] * n_fixed + [True] * (len(pieces) - n_fixed)
    return Vocab(pieces, scores, normal), merges


def _merge_pair(symbols: list[str], a: str, b: str) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out
