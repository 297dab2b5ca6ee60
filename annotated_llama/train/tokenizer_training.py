"""Train a SentencePiece BPE tokenizer with LLaMA's settings.

LLaMA paper 2.1 (Tokenizer): "We tokenize the data with the byte-pair encoding (BPE) algorithm
(Sennrich et al., 2015), using the implementation from SentencePiece (Kudo and Richardson,
2018). Notably, we split all numbers into individual digits, and fallback to bytes to decompose
unknown UTF-8 characters." The other settings below are the ones stored in the trainer_spec
and normalizer_spec of Meta's released tokenizer.model (read them with
`sentencepiece_model_pb2.ModelProto`): identity normalization (no NFKC), a dummy prefix space,
extra whitespace kept, whitespace-only pieces allowed, <unk> 0, <s> 1, </s> 2 and no pad piece.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

from ..data.pretokenize import _SENTENCE_END, documents, read_corpus

LLAMA_TRAINER_SPEC = dict(
    model_type="bpe",
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_by_unicode_script=True,
    split_by_whitespace=True,
    split_by_number=True,
    max_sentencepiece_length=16,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
)


def _sentences(text: str):
    # SentencePiece trains on "sentences" of at most max_sentence_length bytes; cutting the
    # corpus at sentence ends keeps every character in play (a too-long line is dropped whole).
    for doc in documents(text):
        for part in doc.split("\n"):
            for sentence in _SENTENCE_END.split(part):
                if sentence.strip():
                    yield sentence


def train_tokenizer(corpora, vocab_size: int, out_dir, character_coverage: float = 0.9999,
                    seed_threads: int = 2) -> Path:
    """Train on the text files `corpora`; writes OUT/tokenizer.model and returns its path."""
    if vocab_size < 260:
        # 3 specials + 256 byte pieces come first with byte_fallback
        raise ValueError(f"--vocab-size must be at least 260 (3 special + 256 byte pieces), got {vocab_size}")
    text = read_corpus(corpora)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(text), model_writer=buffer, vocab_size=vocab_size,
            character_coverage=character_coverage, num_threads=seed_threads,
            max_sentence_length=16384, input_sentence_size=0, shuffle_input_sentence=False,
            minloglevel=2, **LLAMA_TRAINER_SPEC)
    except RuntimeError as e:  # e.g. "Vocabulary size too high": too small a corpus for the vocabulary
        raise ValueError(f"SentencePiece could not train a {vocab_size}-piece vocabulary: {e}") from None
    path = out / "tokenizer.model"
    tmp = out / "tokenizer.model.tmp"
    with open(tmp, "wb") as f:
        f.write(buffer.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
