"""Structured output, the grammar side: `response_format` (`json_object`, `json_schema`) and a forced
tool call's parameters turned into a per-request constraint that masks the logits of one row.

The protocol the engine calls, per row of a batch and per step:
    constraint.apply(logits_row)   (V,) float tensor, in place: every token the grammar does not
                                   allow next becomes -inf (ids past the tokenizer's vocabulary,
                                   in a padded embedding, too)
    constraint.advance(token_id)   the sampled token; ValueError if the grammar did not allow it
    constraint.is_finished()       the grammar has accepted a complete value and allows nothing
                                   more: the engine ends the row with finish_reason "stop"
An end-of-sequence token is allowed exactly when the value is complete, so a row that samples it
ends as it would unconstrained.

Why llguidance (guidance-ai/llguidance, MIT): of the three well-kept libraries, it is the one that
installs here as a single wheel with no dependencies (xgrammar 0.2 pulls in triton, a CUDA
toolchain package, and transformers; outlines-core is dependency-free too), and it computes each
mask on the fly from an Earley parser over a lazily built lexer (~50 us per token for a 128k
vocabulary, by its README), with no per-schema precomputation: outlines-core compiles a schema
into an automaton over the whole vocabulary before the first token, which costs seconds for large
schemas and rules out recursive ones. llguidance covers the JSON Schema features of OpenAI's
strict subset (objects, required, enums, const, anyOf, $ref/$defs including recursion, numeric
ranges, pattern, format, minItems/maxItems), and it is what OpenAI's own Structured Outputs, vLLM,
SGLang and llama.cpp use (its README). It runs on the CPU; the mask is moved to the logits' device.

JSON is generated compactly with one space after "," and ":" (no free whitespace, so a sampled
reply cannot wander in blank lines until max_tokens), and a single leading space is allowed before
the value: SentencePiece models start a reply with a "▁"-prefixed piece.

Public API:
    vocabulary(tokenizer)                  the library's view of our Tokenizer (built once, cached)
    token_bytes(tokenizer)                 each id's bytes (specials marked), for all three backends
    response_format_grammar(fmt, tokenizer) -> Grammar | None   fmt: the request's dict
    tool_call_grammar(tools, name, tokenizer) -> Grammar        name None: any of `tools`
    check_strict_schema(schema, where)     ValueError unless OpenAI's strict rules hold
    Grammar.constraint() -> Constraint     a fresh one per row (n > 1: one per choice)
"""

from __future__ import annotations

import json
import threading
import weakref
from typing import Optional

import llguidance
import torch

from ..core.tokenizer_formats import _gpt2_bytes_to_unicode

OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_bytes_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.RLock()  # vocabulary() reads token_bytes() while holding it


def token_bytes(tokenizer) -> list[bytes]:
    """Each id's bytes (built once per tokenizer object); special and control tokens get
    llguidance's 0xFF marker before their name, so that no grammar text can ever match them.
    (The server's logprobs read the same table: openai_logprobs.py.)"""
    with _lock:
        if tokenizer not in _bytes_cache:
            _bytes_cache[tokenizer] = _read_token_bytes(tokenizer)
        return _bytes_cache[tokenizer]


def _read_token_bytes(tokenizer) -> list[bytes]:
    out = []
    if tokenizer.sp is not None:
        sp = tokenizer.sp
        for i in range(tokenizer.n_words):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):  # "<0x0A>": byte fallback
                out.append(bytes([int(piece[3:-1], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                out.append(b"\xff" + piece.encode())
            else:
                out.append(piece.replace("\u2581", " ").encode())
        return out
    specials = {i: name for name, i in tokenizer.special_tokens.items()}
    if tokenizer.tt is not None:
        return [b"\xff" + specials[i].encode() if i in specials else tokenizer.tt.decode_single_token_bytes(i)
                for i in range(tokenizer.n_words)]
    # an HF tokenizer.json: GPT-2's byte-level pieces (bytes spelled as printable characters), or
    # SentencePiece-style pieces ("\u2581" for a space, "<0xNN>" byte fallback)
    to_byte = {c: b for b, c in _gpt2_bytes_to_unicode().items()}
    for i in range(tokenizer.n_words):
        piece = tokenizer.hf.id_to_token(i)
        if i in specials or piece is None:
            out.append(b"\xff" + (specials.get(i) or f"<unused{i}>").encode())
        elif tokenizer._byte_level:
            out.append(bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


class _Wrapper:
    """What llguidance.TokenizerWrapper reads: the token bytes, EOS/BOS and a tokenize callback."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens = tokenizer, token_bytes(tokenizer)
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id
        self.special_token_ids = [i for i, b in enumerate(self.tokens) if b[:1] == b"\xff"]
        # SentencePiece prepends "▁" to what it encodes; llguidance tokenizes text in the middle
        # of a reply, so encode after a newline and drop the newline's pieces
        spm_like = tokenizer.sp is not None or (tokenizer.hf is not None and not tokenizer._byte_level)
        self.lead = tokenizer.encode("\n", bos=False, eos=False) if spm_like else []

    def __call__(self, text: str) -> list[int]:
        if not self.lead:
            return self.tokenizer.encode(text, bos=False, eos=False)
        ids = self.tokenizer.encode("\n" + text, bos=False, eos=False)
        return ids[len(self.lead):] if ids[:len(self.lead)] == self.lead else ids


def vocabulary(tokenizer):
    """llguidance's LLTokenizer for our Tokenizer (SentencePiece, tiktoken, GGUF or tokenizer.json),
    once per tokenizer object: ~0.1 s for 32k pieces, ~1 s for Llama 3's 128k."""
    with _lock:
        if tokenizer not in _cache:
            stops = sorted(tokenizer.stop_ids)
            _cache[tokenizer] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapper(tokenizer)),
                                                       n_vocab=tokenizer.n_words, eos_token=stops)
        return _cache[tokenizer]


class Constraint:
    """One row's grammar state (see the module docstring for the protocol)."""

    def __init__(self, matcher, n_words: int, stop_ids=()):
        self.matcher, self.n_words, self.stop_ids = matcher, n_words, set(stop_ids)
        self._shifts: dict = {}

    def apply(self, logits_row: torch.Tensor) -> None:
        bits = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # (ceil(n/32),)
        shifts = self._shifts.get(logits_row.device)
        if shifts is None:
            shifts = self._shifts[logits_row.device] = torch.arange(32, dtype=torch.int32, device=logits_row.device)
        bits = bits.to(logits_row.device)
        allowed = ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:self.n_words].bool()  # (n_words,)
        if not allowed.any():  # a dead end (never expected): allow the stop ids, so the row ends
            allowed[list(self.stop_ids)] = True
        V = logits_row.shape[-1]
        if V > self.n_words:  # a padded embedding: ids no tokenizer can decode are never allowed
            logits_row[self.n_words:] = float("-inf")
        logits_row[:min(V, self.n_words)].masked_fill_(~allowed[:V], float("-inf"))

    def advance(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            raise ValueError(f"token {token_id} breaks the grammar: {self.matcher.get_error()}")

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


class Grammar:
    """A compiled grammar for one request; `constraint()` gives each row its own state."""

    def __init__(self, grammar: str, tokenizer):
        self.text, self.tokenizer = grammar, tokenizer
        self.vocab = vocabulary(tokenizer)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.vocab)
        if error and not error.startswith("WARNING"):
            raise ValueError(error.strip().splitlines()[0])

    def constraint(self) -> Constraint:
        matcher = llguidance.LLMatcher(self.vocab, self.text, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error().strip().splitlines()[0])
        return Constraint(matcher, self.tokenizer.n_words, self.tokenizer.stop_ids)


def _json_grammar(schema: dict, tokenizer) -> Grammar:
    schema = {**schema, "x-guidance": OPTIONS}  # our options, whatever the client put there
    return Grammar(llguidance.LLMatcher.grammar_from_lark('start: " "? value\nvalue: %json ' + json.dumps(schema)),
                   tokenizer)


def response_format_grammar(fmt: dict, tokenizer) -> Optional[Grammar]:
    """The grammar of a request's response_format ({"type": "text"} needs none). ValueError
    (message naming the place) for a schema that cannot be enforced."""
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _json_grammar({"type": "object"}, tokenizer)
    if kind != "json_schema":
        raise ValueError(f"response_format.type {kind!r} is not one of text, json_object, json_schema")
    spec = fmt.get("json_schema") or {}
    schema = spec.get("schema")
    if schema is None:
        schema = {}
    if not isinstance(schema, dict):
        raise ValueError("response_format.json_schema.schema must be a JSON Schema object")
    if spec.get("strict"):
        check_strict_schema(schema, "response_format.json_schema.schema")
    return _json_grammar(schema, tokenizer)


def tool_call_grammar(tools: list[dict], name: Optional[str], tokenizer) -> Grammar:
    """A forced call in Llama 3.1's format, {"name": NAME, "parameters": {...}}, the parameters
    following the function's schema; `name` None: a call of any tool ("required")."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        # OpenAI: "omitting parameters defines a function with an empty parameter list"
        params = fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}
        if fn.get("strict"):
            check_strict_schema(params, f"tools.{fn['name']}.function.parameters")
        options.append({"type": "object", "properties": {"name": {"const": fn["name"]}, "parameters": params},
                        "required": ["name", "parameters"], "additionalProperties": False})
    if not options:
        raise ValueError(f"tool_choice names {name!r}, which is not one of the tools")
    return _json_grammar(options[0] if len(options) == 1 else {"anyOf": options}, tokenizer)


# OpenAI's rules for strict schemas (the "Supported schemas" section of its Structured Outputs
# guide): the root is an object, every object lists all its properties as required and sets
# additionalProperties to false, and the composition keywords below are not supported.
_NOT_IN_STRICT = ("allOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "patternProperties")


def check_strict_schema(schema: dict, where: str) -> None:
    """ValueError naming the first place where `schema` breaks OpenAI's strict-mode rules."""
    if schema.get("type") != "object" or "anyOf" in schema:
        raise ValueError(f"{where}: a strict schema's root must be an object (type: object, not anyOf)")
    stack = [(where, schema)]
    while stack:
        at, node = stack.pop()
        if not isinstance(node, dict):
            continue
        for key in _NOT_IN_STRICT:
            if key in node:
                raise ValueError(f"{at}: {key!r} is not supported in strict mode")
        types = node.get("type")
        if types == "object" or isinstance(types, list) and "object" in types:
            props = node.get("properties", {})
            if node.get("additionalProperties") is not False:
                raise ValueError(f"{at}: strict mode needs 'additionalProperties': false on every object")
            if sorted(node.get("required", [])) != sorted(props):
                raise ValueError(f"{at}: strict mode needs every property in 'required' "
                                 f"(missing: {', '.join(sorted(set(props) - set(node.get('required', []))))})")
        for key in ("properties", "$defs", "definitions"):
            for name, sub in (node.get(key) or {}).items():
                stack.append((f"{at}.{key}.{name}", sub))
        for key in ("items", "additionalItems"):
            if isinstance(node.get(key), dict):
                stack.append((f"{at}.{key}", node[key]))
        for key in ("anyOf", "prefixItems"):
            for i, sub in enumerate(node.get(key) or []):
                stack.append((f"{at}.{key}.{i}", sub))
