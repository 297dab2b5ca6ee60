"""Log probabilities in OpenAI's two shapes, from the engine's (token id, logprob, top-k) triples.

The engine reports, for every generated token, its log-probability under the model's own
distribution (before penalties, logit bias, a grammar's mask or temperature: the raw softmax, as
OpenAI and vLLM report them) and the k most likely alternatives; with echo, the same for every
prompt token after the first (which has no context to be predicted from). This module only shapes
them (OpenAI's API reference, "The chat completion object" and the legacy "Completions" object):

  chat        choice.logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
              [{"token", "logprob", "bytes"}] (k of them)}], "refusal": null}
  completions choice.logprobs = {"tokens": [str], "token_logprobs": [float | null],
              "top_logprobs": [{token: logprob} | null], "text_offset": [int]}; each
              top_logprobs dict holds the k most likely tokens and the chosen one ("up to
              logprobs + 1 elements"); with echo the prompt's tokens come first, the first
              of them with null.

A token's string is its bytes as UTF-8. A token that is only part of a character (a byte-fallback
piece, or a byte-level BPE piece that splits one) has no string of its own: it is written
"bytes:\\xe2\\x80" as OpenAI writes it, and its `bytes` say what it is. Special tokens are their
names ("<|eot_id|>").
"""

from __future__ import annotations

from typing import Optional, Sequence

from ..inference.streaming import IncrementalDecoder
from ..inference.structured_output import token_bytes

Triple = tuple  # (token id, logprob, [(token id, logprob)] most likely first)


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(the token's string, its bytes) as OpenAI reports them."""
    raw = token_bytes(tokenizer)[token_id]
    if raw[:1] == b"\xff":  # a special or control token: its name
        raw = raw[1:]
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


def _one(tokenizer, token_id: int, logprob: float) -> dict:
    text, raw = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": raw}


def chat_content(tokenizer, triples: Sequence[Triple]) -> list[dict]:
    """The `content` entries of chat logprobs, one per generated token."""
    return [{**_one(tokenizer, t, lp), "top_logprobs": [_one(tokenizer, i, v) for i, v in top or ()]}
            for t, lp, top in triples]


def chat_logprobs(tokenizer, triples: Sequence[Triple]) -> dict:
    return {"content": chat_content(tokenizer, triples), "refusal": None}


def _top_dict(tokenizer, token_id: int, logprob: float, top) -> dict:
    out = {token_text(tokenizer, i)[0]: v for i, v in top or ()}
    out.setdefault(token_text(tokenizer, token_id)[0], logprob)  # the chosen token is always there
    return out


def completion_logprobs(tokenizer, triples: Sequence[Triple], offsets: Sequence[int],
                        prompt: Optional[tuple] = None) -> dict:
    """The legacy shape. triples: the generated tokens; offsets: where each one's text starts in
    the choice's text. prompt: (ids, logprobs, tops) with echo (logprobs[0] and tops[0] None)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if prompt is not None:
        ids, lps, tops = prompt
        decoder, at = IncrementalDecoder(tokenizer), 0
        for i, (t, lp, top) in enumerate(zip(ids, lps, tops)):
            out["tokens"].append(token_text(tokenizer, t)[0])
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(None if lp is None else _top_dict(tokenizer, t, lp, top))
            out["text_offset"].append(at)
            at += len(decoder.push(t))  # the prompt's text as the tokenizer decodes it
    for (t, lp, top), at in zip(triples, offsets):
        out["tokens"].append(token_text(tokenizer, t)[0])
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(_top_dict(tokenizer, t, lp, top))
        out["text_offset"].append(at)
    return out


def mean_logprob(triples: Sequence[Triple]) -> float:
    """best_of's ranking: the mean log-probability per generated token (OpenAI's "highest log
    probability per token"). The engine reports no logprob for the stop token that ends a
    completion, so an empty completion has nothing to be ranked by and ranks last."""
    return sum(lp for _, lp, _ in triples) / len(triples) if triples else float("-inf")
