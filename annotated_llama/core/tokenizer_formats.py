"""Tokenizer file formats, parsed directly: Meta's tiktoken file
(base64 piece, rank), GPT-2's byte-to-character map, and a SentencePiece model rebuilt from a
GGUF vocabulary. tokenizer.py builds its backends on these."""

from __future__ import annotations

import base64
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb

# GGUF token types (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

def _looks_like_tiktoken(data: bytes) -> bool:
    # Meta's Llama 3 tokenizer.model is text: "<base64 piece> <rank>" per line.
    head = data[:256].split(b"\n")[0].split(b" ")
    return len(head) == 2 and head[1].isdigit() and data[:1] not in (b"\n", b"")


def _read_tiktoken_ranks(data: bytes, path: Path) -> dict[bytes, int]:
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            piece, rank = line.split(b" ")
            ranks[base64.b64decode(piece, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}: line {lineno} is not '<base64> <rank>' (corrupt tiktoken file)") from None
    return ranks


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map, used for BPE vocabularies in GGUF:
    # printable Latin-1 bytes map to themselves, the other 68 to chr(256 + k) in order.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _sentencepiece_proto(tokens, scores, types, unk_id, bos_id, eos_id, add_space_prefix) -> bytes:
    # Rebuild a SentencePiece ModelProto with LLaMA's trainer and normalizer settings
    # (BPE, split digits, byte fallback, identity normalization, dummy prefix).
    m = pb.ModelProto()
    kinds = {GGUF_NORMAL: pb.ModelProto.SentencePiece.NORMAL, GGUF_UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
             GGUF_CONTROL: pb.ModelProto.SentencePiece.CONTROL,
             GGUF_USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
             GGUF_UNUSED: pb.ModelProto.SentencePiece.UNUSED, GGUF_BYTE: pb.ModelProto.SentencePiece.BYTE}
    for tok, score, typ in zip(tokens, scores, types):
        piece = m.pieces.add()
        piece.piece, piece.score, piece.type = tok, float(score), kinds.get(int(typ), kinds[GGUF_NORMAL])
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.split_digits = True
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = int(unk_id), int(bos_id), int(eos_id), -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(add_space_prefix)
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m.SerializeToString()
