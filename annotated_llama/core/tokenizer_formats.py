"""Tokenizer file formats, parsed directly: GGUF's metadata header, Meta's tiktoken file
(base64 piece, rank), GPT-2's byte-to-character map, and a SentencePiece model rebuilt from a
GGUF vocabulary. tokenizer.py builds its backends on these."""

from __future__ import annotations

import base64
import struct
from pathlib import Path

# GGUF token types (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6

# GGUF metadata value types (ggml's gguf.h): scalar struct formats, 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(data: bytes) -> dict:
    """The key/value section of a GGUF file (format version 2 or 3), as Python values.

    The `gguf` package's GGUFReader also maps every array element to its own numpy view,
    which takes ~8 s for Llama 3's 280k merges; reading the header directly takes well
    under a second. Layout: magic "GGUF", u32 version, u64 tensor count, u64 kv count,
    then per kv: string key, u32 type, value (strings are u64 length + UTF-8 bytes).
    """
    import numpy as np

    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    if len(data) < 24:
        raise ValueError("truncated GGUF header")
    version, _, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    pos = 24

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + n
        if pos > len(data):
            raise ValueError("truncated string")
        return data[pos - n:pos].decode("utf-8")

    def value(kind):
        nonlocal pos
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if item_kind in _GGUF_SCALARS and item_kind != 7:  # numbers: one vectorised read
                dtype = np.dtype(_GGUF_SCALARS[item_kind])
                arr = np.frombuffer(data, dtype=dtype, count=count, offset=pos)
                pos += count * dtype.itemsize
                return arr.tolist()
            return [value(item_kind) for _ in range(count)]
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        fmt = _GGUF_SCALARS[kind]
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    out = {}
    try:
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", data, pos)
            pos += 4
            out[key] = value(kind)
    except struct.error:
        raise ValueError("truncated GGUF header") from None
    return out


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
    from sentencepiece import sentencepiece_model_pb2 as pb

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
