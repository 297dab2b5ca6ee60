"""Tokenizers: SentencePiece BPE (LLaMA 1/2), tiktoken BPE (Llama 3), either read from a GGUF
file's `tokenizer.ggml.*` keys, or a Hugging Face `tokenizer.json` (what Hub snapshots ship,
read with the `tokenizers` library: byte-level BPE for Llama 3, SentencePiece-style BPE for Llama 2).

LLaMA 1/2 (paper 2.1): BPE as implemented by SentencePiece, all numbers split into digits,
unknown UTF-8 characters decomposed into bytes. 32,000 pieces: <unk> 0, <s> 1, </s> 2, no pad
piece (pad_id -1). Llama 3: a 128,000-piece tiktoken BPE plus 256 special tokens, and
generation ends on either <|end_of_text|> or <|eot_id|>.

Beside a tokenizer file, the model directory's tokenizer_config.json, chat_template.jinja and
generation_config.json (hf_files.py) set the special tokens, the chat template, the stop ids
and the sampling defaults, as transformers reads them.
"""

from __future__ import annotations

import base64
import json
import mmap
import re
from pathlib import Path

import sentencepiece as spm
import tiktoken
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import Tokenizer as HFTokenizer

from .gguf_file import read_gguf
from .hf_files import eos_ids, read_model_files, sampling_defaults, token_text
from .tokenizer_formats import (GGUF_BYTE, GGUF_CONTROL, GGUF_NORMAL, GGUF_UNKNOWN, GGUF_UNUSED,  # noqa: F401
                                GGUF_USER_DEFINED, _gpt2_bytes_to_unicode, _looks_like_tiktoken,
                                _read_tiktoken_ranks, _sentencepiece_proto)

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


class Tokenizer:
    """`Tokenizer(path)` for a SentencePiece or tiktoken `tokenizer.model`, an HF `tokenizer.json`,
    or a `.gguf` file. Files beside a tokenizer.model/.json (tokenizer_config.json,
    generation_config.json, chat_template.jinja) are read too.

    Beyond Meta's interface: `chat_template` (the model's own Jinja template, None when it has
    none; `chat_templates` holds every named one), `generation_config` (the raw dict or None) and
    `generation_defaults` (its sampling values under our argument names), `add_bos` (False only
    when tokenizer_config.json says add_bos_token: false)."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: tokenizer file not found")
        self.sp = None  # SentencePieceProcessor (LLaMA 1/2) or None
        self.tt = None  # tiktoken.Encoding (Llama 3) or None
        self.hf = None  # tokenizers.Tokenizer (an HF tokenizer.json) or None
        self.chat_templates: dict[str, str] = {}
        self.generation_config: dict | None = None
        self.hf_config: dict | None = None  # tokenizer_config.json as read
        self.add_bos = True
        self._specials_re = None
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":  # a whole model file, maybe many GB: map it, read only the header
            self._load_gguf()
            return
        data = self.path.read_bytes()
        if self.path.suffix == ".json" or data.lstrip()[:1] == b"{":
            self._init_tokenizers(data)
        elif _looks_like_tiktoken(data):
            self._init_tiktoken(_read_tiktoken_ranks(data, self.path), None)
        else:
            self._init_sentencepiece(data)
        self._apply_model_files()

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

    def _init_tokenizers(self, data: bytes):
        try:
            self._json = data.decode("utf-8")
            self.hf = HFTokenizer.from_str(self._json)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise ValueError(f"{self.path}: not a tokenizer.json file ({str(e).splitlines()[0][:160]})") from None
        # User text that spells a special token ("<|eot_id|>", "<s>") is encoded as text, as for
        # tiktoken above; templates get a second instance that parses them (encode_template).
        self.hf.encode_special_tokens = True
        self._hf_templates = None
        vocab = self.hf.get_vocab(with_added_tokens=True)
        self.n_words = max(vocab.values()) + 1
        added = self.hf.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        model = json.loads(self._json).get("model", {})
        # byte-level BPE (GPT-2 / Llama 3) has no byte fallback and maps bytes to printable characters
        self._byte_level = '"ByteLevel"' in self._json and not model.get("byte_fallback", False)

        def first(*names):
            return next((vocab[n] for n in names if n in vocab), -1)

        # tokenizer_config.json, read next, names them; these are the Llama defaults
        self.bos_id = first("<|begin_of_text|>", "<s>")
        self.eos_id = first("<|end_of_text|>", "</s>")
        self.pad_id = -1
        self.stop_ids = {self.special_tokens[n] for n in STOP_NAMES if n in self.special_tokens} | (
            {self.eos_id} if self.eos_id >= 0 else set())

    def _apply_model_files(self):
        files = read_model_files(self.path.parent)
        self.chat_templates = files.chat_templates
        self.generation_config = files.generation_config
        self.hf_config = cfg = files.tokenizer_config
        where = self.path.parent / "tokenizer_config.json"
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
            if cfg is None or key not in cfg:
                continue
            try:
                text = token_text(cfg[key])
            except ValueError as e:
                raise ValueError(f"{where}: {key}: {e}") from None
            setattr(self, attr, -1 if text is None else self.piece_id(text, f"{where}: {key}"))
        if cfg is not None and cfg.get("add_bos_token") is False:
            self.add_bos = False
        if self.generation_config is not None:  # the ids transformers' generate() stops on
            try:
                listed = eos_ids(self.generation_config)
            except ValueError as e:
                raise ValueError(f"{self.path.parent / 'generation_config.json'}: {e}") from None
            bad = [i for i in listed if not 0 <= i < self.n_words]
            if bad:
                raise ValueError(f"{self.path.parent / 'generation_config.json'}: eos_token_id {bad[0]} is not "
                                 f"in the vocabulary of {self.n_words} ids")
            self.stop_ids = set(listed) | ({self.eos_id} if self.eos_id >= 0 else set())
        elif cfg is not None and "eos_token" in cfg and self.eos_id >= 0 and self.hf is not None:
            self.stop_ids = {self.eos_id}  # the config's eos is the stop, as in transformers

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template (tokenizer_config.json, chat_template.jinja or the
        GGUF key tokenizer.chat_template), or None."""
        return self.chat_templates.get("default")

    @property
    def generation_defaults(self) -> dict:
        """Sampling values from generation_config.json (temperature, top_p, top_k,
        repetition_penalty, max_new_tokens: only those the file states; {} without one)."""
        return sampling_defaults(self.generation_config)

    def _load_gguf(self):
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                meta = read_gguf(data, vocabulary=True, tensors=False)[0]
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: cannot read GGUF file ({e})") from None
        if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{self.path}: GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
        model, tokens = meta["tokenizer.ggml.model"], meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type", [GGUF_NORMAL] * len(tokens))

        def get(key, default):
            return meta.get(key, default)

        if isinstance(meta.get("tokenizer.chat_template"), str):
            self.chat_templates = {"default": meta["tokenizer.chat_template"]}
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
        return "sentencepiece" if self.sp is not None else "tiktoken" if self.tt is not None else "tokenizers"

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        if self.sp is not None:
            ids = self.sp.encode(s)
        elif self.tt is not None:
            # Special-token text in user input is encoded as plain text, as Meta's Llama 3 does
            # (disallowed_special=()); templates insert specials by id, never by string.
            ids = []
            for chunk in _chunks_for_tiktoken(s):
                ids.extend(self.tt.encode(chunk, allowed_special=set(), disallowed_special=()))
        else:
            ids = self.hf.encode(s, add_special_tokens=False).ids
        # a vocabulary without BOS (or a model whose tokenizer_config.json says add_bos_token:
        # false) gets none; Llama's always have one
        if bos and self.bos_id >= 0 and self.add_bos:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def encode_template(self, text: str) -> list[int]:
        """Ids of text a chat template wrote: special-token text in it ("<|eot_id|>", "<s>") becomes
        the special id, as transformers tokenizes apply_chat_template's output. Never for user text."""
        if self.hf is not None:
            if self._hf_templates is None:
                self._hf_templates = HFTokenizer.from_str(self._json)  # encode_special_tokens off
            return self._hf_templates.encode(text, add_special_tokens=False).ids
        # SentencePiece and tiktoken: cut at the specials' text, encode the rest as text
        specials = self.template_tokens()
        ids: list[int] = []
        for i, part in enumerate(self.specials_pattern().split(text)):
            if i % 2:
                ids.append(specials[part])
            elif part:
                ids += self.encode(part, bos=False, eos=False)
        return ids

    def template_tokens(self) -> dict[str, int]:
        """Text -> id of every token a template may spell out: special and added tokens
        (SentencePiece: control, unknown and user-defined pieces)."""
        if self._specials_re is None:
            if self.hf is not None:
                tokens = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items()}
            elif self.tt is not None:
                tokens = dict(self.special_tokens)
            else:
                m = pb.ModelProto()
                m.ParseFromString(self.sp.serialized_model_proto())  # the Python API has no is_user_defined
                kinds = (m.SentencePiece.CONTROL, m.SentencePiece.UNKNOWN, m.SentencePiece.USER_DEFINED)
                tokens = {piece.piece: i for i, piece in enumerate(m.pieces) if piece.type in kinds}
            names = sorted(tokens, key=len, reverse=True)  # longest first: "<|eot_id|>" before "<|"
            self._template_tokens = tokens
            self._specials_re = re.compile("(" + "|".join(map(re.escape, names)) + ")" if names else "((?!))")
        return self._template_tokens

    def specials_pattern(self) -> re.Pattern:
        """A regex with one group matching any template token (splitting on it alternates text
        and tokens)."""
        self.template_tokens()
        return self._specials_re

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.sp is not None:
            return self.sp.decode(ids)
        if self.tt is not None:
            return self.tt.decode(ids, errors="replace")
        return self.hf.decode(ids, skip_special_tokens=False)  # specials spelled out, as tiktoken

    def check_fits(self, vocab_size: int, model="the model") -> None:
        """The one vocabulary check: every id this tokenizer makes must have an embedding."""
        if self.n_words > vocab_size:
            raise ValueError(f"{self.path}: the tokenizer has {self.n_words} ids but {model} only "
                             f"{vocab_size} embeddings")

    def special_id(self, name: str) -> int:
        """Id of a special token such as "<|eot_id|>" (Llama 3 vocabularies)."""
        if name not in self.special_tokens:
            raise KeyError(f"{self.path}: no special token {name!r} in this vocabulary")
        return self.special_tokens[name]

    def piece_id(self, text: str, where: str) -> int:
        """The id of the piece spelled `text` (a special token's name); ValueError naming `where`."""
        if self.sp is not None:
            i = self.sp.piece_to_id(text)
            found = self.sp.id_to_piece(i) == text
        elif self.tt is not None:
            i = self.special_tokens.get(text, self.tt._mergeable_ranks.get(text.encode("utf-8"), -1))
            found = i >= 0
        else:
            i = self.hf.token_to_id(text)
            found = i is not None
        if not found:
            raise ValueError(f"{where}: token {text!r} is not in the vocabulary of {self.path.name}")
        return int(i)

    def id_to_piece(self, i: int) -> str:
        if self.sp is not None:
            return self.sp.id_to_piece(int(i))
        if self.tt is not None:
            return self.tt.decode_single_token_bytes(int(i)).decode("utf-8", errors="replace")
        piece = self.hf.id_to_token(int(i))
        if piece is None:
            raise IndexError(f"{self.path}: no token with id {i}")
        if self._byte_level and piece not in self.special_tokens:  # GPT-2's printable bytes -> text
            to_byte = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
            return bytes(to_byte[c] for c in piece).decode("utf-8", errors="replace")
        return piece

    def model_bytes(self) -> bytes:
        """A `tokenizer.model` equivalent of this vocabulary, for saving beside weights."""
        if self.sp is not None:
            return self.sp.serialized_model_proto()
        if self.tt is None:
            raise ValueError(f"{self.path}: a tokenizer.json vocabulary has no tokenizer.model form; "
                             "save it with Tokenizer.files()")
        regular = sorted(((rank, piece) for piece, rank in self.tt._mergeable_ranks.items()))
        return b"".join(base64.b64encode(piece) + b" %d\n" % rank for rank, piece in regular)

    def files(self) -> dict[str, bytes]:
        """The files that give this tokenizer back when written into a model directory:
        tokenizer.model or tokenizer.json, plus the tokenizer_config.json (chat template
        included) and generation_config.json it was read with."""
        out = {"tokenizer.json": self._json.encode("utf-8")} if self.hf is not None else \
            {"tokenizer.model": self.model_bytes()}
        config = dict(self.hf_config or {})
        if self.chat_templates:  # also for GGUF's tokenizer.chat_template
            named = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
            config["chat_template"] = self.chat_template if list(self.chat_templates) == ["default"] else named
        if config:
            out["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False).encode("utf-8")
        if self.generation_config is not None:
            out["generation_config.json"] = json.dumps(self.generation_config, indent=2).encode("utf-8")
        return out


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


def default_tokenizer_path(model_dir, parent: bool = True) -> Path | None:
    """Where Meta/HF/our checkpoints keep the tokenizer: tokenizer.model in the dir, else its
    tokenizer.json (Hub snapshots of Llama 3 ship only that), else (Meta, `parent`) the parent's
    tokenizer.model. tokenizer.model wins over tokenizer.json: it is the vocabulary the model
    was trained with (Meta's reference tokenizes with it), and transformers' conversion of a
    SentencePiece model to tokenizer.json splits some runs of spaces differently."""
    model_dir = Path(model_dir)
    candidates = [model_dir / "tokenizer.model", model_dir / "tokenizer.json"]
    if parent:
        candidates.append(model_dir.parent / "tokenizer.model")
    return next((c for c in candidates if c.is_file()), None)


__all__ = ["Tokenizer", "default_tokenizer_path"]
