"""Tokenizers: SentencePiece BPE (LLaMA 1/2), tiktoken BPE (Llama 3), or either read from a
GGUF file's `tokenizer.ggml.*` keys.

LLaMA 1/2 (paper 2.1): BPE as implemented by SentencePiece, all numbers split into digits,
unknown UTF-8 characters decomposed into bytes. 32,000 pieces: <unk> 0, <s> 1, </s> 2, no pad
piece (pad_id -1). Llama 3: a 128,000-piece tiktoken BPE plus 256 special tokens, and
generation ends on either <|end_of_text|> or <|eot_id|>.
"""

from __future__ import annotations

import base64
import mmap
import struct
from pathlib import Path

import sentencepiece as spm
import tiktoken

# Llama 3's pre-tokenizer split (meta-llama/llama3 tokenizer.py, pat_str): contractions,
# letters with one leading non-letter, numbers in runs of at most three digits, punctuation,
# newlines, whitespace.
LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NUM_SPECIAL = 256
# Ids of Llama 3's named special tokens after the 128,000 regular ones (Llama 3.1 names).
LLAMA3_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                   6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                   10: "<|python_tag|>"}
STOP_NAMES = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# GGUF token types (llama.cpp's llama_token_type)
GGUF_NORMAL, GGUF_UNKNOWN, GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED, GGUF_BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    """`Tokenizer(path)` for a SentencePiece or tiktoken `tokenizer.model`, or a `.gguf` file."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        self.sp = None  # SentencePieceProcessor (LLaMA 1/2) or None
        self.tt = None  # tiktoken.Encoding (Llama 3) or None
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":  # a whole model file, maybe many GB: map it, read only the header
            self._load_gguf()
            return
        data = self.path.read_bytes()
        if _looks_like_tiktoken(data):
            self._init_tiktoken(_read_tiktoken_ranks(data, self.path), None)
        else:
            self._init_sentencepiece(data)

    # ---- backends --------------------------------------------------------------------

    def _init_sentencepiece(self, proto: bytes):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception:
            raise ValueError(f"{self.path}: not a SentencePiece, tiktoken or GGUF tokenizer file") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        self.special_tokens = {}
        self.stop_ids = {self.eos_id}

    def _init_tiktoken(self, ranks: dict[bytes, int], specials: dict[str, int] | None):
        n = len(ranks)
        if specials is None:  # Meta's file has no specials: they follow the regular pieces
            specials = {LLAMA3_SPECIALS.get(i, f"<|reserved_special_token_{i}|>"): n + i
                        for i in range(LLAMA3_NUM_SPECIAL)}
        self.tt = tiktoken.Encoding(name=self.path.name, pat_str=LLAMA3_PAT, mergeable_ranks=ranks,
                                    special_tokens=specials)
        self.special_tokens = dict(specials)
        self.n_words = self.tt.n_vocab
        self.bos_id = specials.get("<|begin_of_text|>", -1)
        self.eos_id = specials.get("<|end_of_text|>", -1)
        self.pad_id = -1
        self.stop_ids = {specials[name] for name in STOP_NAMES if name in specials}

    def _load_gguf(self):
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                meta = read_gguf_metadata(data)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: cannot read GGUF file ({e})") from None
        if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{self.path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        model, tokens = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens))

        def get(key, default):
            return meta.get(key, default)

        if model == "llama":
            scores = get("tokenizer.ggml.scores", [0.0] * len(tokens))
            proto = _sentencepiece_proto(tokens, scores, types, get("tokenizer.ggml.unknown_token_id", 0),
                                         get("tokenizer.ggml.bos_token_id", 1), get("tokenizer.ggml.eos_token_id", 2),
                                         get("tokenizer.ggml.add_space_prefix", True))
            self._init_sentencepiece(proto)
        elif model == "gpt2":
            decoder = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
            ranks, specials = {}, {}
            for i, (tok, typ) in enumerate(zip(tokens, types)):
                if typ in (GGUF_CONTROL, GGUF_USER_DEFINED, GGUF_UNUSED):
                    specials[tok] = i
                else:
                    ranks[bytes(decoder[c] for c in tok)] = i
            self._init_tiktoken(ranks, specials)
            self.bos_id = get("tokenizer.ggml.bos_token_id", self.bos_id)
            self.eos_id = get("tokenizer.ggml.eos_token_id", self.eos_id)
        else:
            raise ValueError(f"{self.path}: unsupported GGUF tokenizer model {model!r} (expected 'llama' or 'gpt2')")

    # ---- the interface Meta's generation code uses -------------------------------------

    @property
    def kind(self) -> str:
        return "sentencepiece" if self.sp is not None else "tiktoken"

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        if self.sp is not None:
            ids = self.sp.encode(s)
        else:
            # Special-token text in user input is encoded as plain text, as Meta's Llama 3 does
            # (disallowed_special=()); templates insert specials by id, never by string.
            ids = []
            for chunk in _chunks_for_tiktoken(s):
                ids.extend(self.tt.encode(chunk, allowed_special=set(), disallowed_special=()))
        if bos:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.tt.decode(ids, errors="replace")

    def special_id(self, name: str) -> int:
        """Id of a special token such as "<|eot_id|>" (Llama 3 vocabularies)."""
        if name not in self.special_tokens:
            raise KeyError(f"{self.path}: no special token {name!r} in this vocabulary")
        return self.special_tokens[name]

    def id_to_piece(self, i: int) -> str:
        if self.sp is not None:
            return self.sp.id_to_piece(int(i))
        return self.tt.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")

    def model_bytes(self) -> bytes:
        """A `tokenizer.model` equivalent of this vocabulary, for saving beside weights."""
        if self.sp is not None:
            return self.sp.serialized_model_proto()
        regular = sorted(((rank, piece) for piece, rank in self.tt._mergeable_ranks.items()))
        return b"".join(base64.b64encode(piece) + b" %d\n" % rank for rank, piece in regular)


# ---- file formats ---------------------------------------------------------------------------

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


def _chunks_for_tiktoken(s: str, max_chars: int = 400_000, max_run: int = 25_000):
    # tiktoken's regex engine can overflow its stack on very long runs of whitespace or
    # non-whitespace; Meta's Llama 3 tokenizer splits at 400k chars and 25k-char runs.
    for i in range(0, max(len(s), 1), max_chars):
        chunk = s[i:i + max_chars]
        start, run, prev_space = 0, 0, None
        for j, ch in enumerate(chunk):
            space = ch.isspace()
            run = run + 1 if space == prev_space else 1
            prev_space = space
            if run > max_run:
                yield chunk[start:j]
                start, run = j, 1
        yield chunk[start:]


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


def default_tokenizer_path(model_dir) -> Path | None:
    """Where Meta/HF/our checkpoints keep the tokenizer: in the dir, or (Meta) its parent."""
    model_dir = Path(model_dir)
    for candidate in (model_dir / "tokenizer.model", model_dir.parent / "tokenizer.model"):
        if candidate.is_file():
            return candidate
    return None


__all__ = ["Tokenizer", "default_tokenizer_path"]
