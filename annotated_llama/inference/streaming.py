"""Streaming text out of a token stream: incremental detokenization and stop strings.

Two problems make "decode each new token and print it" wrong (abetlen/llama-cpp-python #8;
huggingface/transformers TextStreamer):
  1. A token is not a piece of text. SentencePiece byte-fallback tokens (<0xF0> <0x9F> ...) and
     tiktoken's byte-level tokens split multi-byte UTF-8 characters; decoding them one at a time
     prints U+FFFD garbage. And SentencePiece drops the leading space of the first piece of
     whatever it decodes ("▁world" alone decodes to "world"), so per-token decoding loses spaces.
  2. A stop string ("\\n### Instruction:") can arrive split over several tokens, and text that
     might be its beginning must not reach the user until we know it is not.

`IncrementalDecoder` solves 1 the way vLLM's `detokenize_incrementally` and HF TGI do: decode a
short window of recent tokens twice (with and without the new ones) and emit the difference,
holding back while the text ends in an incomplete character. The window starts at an already
emitted token (or the last prompt token), so the leading space is rendered in context.
`StopStringHolder` solves 2: it emits text only when no stop string can still begin in it.

Public API (stable; the server's scheduler uses it per request):
    decode_continuation(tokenizer, context_ids, ids) -> str   the non-streamed text of `ids`
    IncrementalDecoder(tokenizer, context_ids=()).push(id) -> str, .flush() -> str
    StopStringHolder(stops).push(text) -> str, .flush() -> str, .stopped
    find_stop(text, stops) -> int                              earliest stop index, or -1
    TextStream(tokenizer, context_ids=(), stops=()).push(id) -> str, .flush() -> str, .stopped
The pieces a stream yields always concatenate to the text its non-streamed twin returns.
"""

from __future__ import annotations

from typing import Iterable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder produces for bytes that are not (yet) a whole character


def decode_continuation(tokenizer, context_ids: Sequence[int], ids: Sequence[int]) -> str:
    """The text of `ids` as it reads after `context_ids` (the prompt): decode both together and
    drop the context's text, so a leading space survives. Only the last context token matters."""
    ctx = list(context_ids[-1:])
    return tokenizer.decode(ctx + list(ids))[len(tokenizer.decode(ctx)):]


class IncrementalDecoder:
    """Feed token ids one at a time; get back only whole characters, spaces included."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids = [int(i) for i in list(context_ids)[-1:]]
        self.prefix_offset = 0  # the window to decode starts here
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT):
            return ""  # nothing new, or a character still incomplete: wait for more bytes
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes to U+FFFD)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


def check_stops(stops: Iterable[str] | str | None) -> tuple[str, ...]:
    """Normalise a `stop` argument (None, a string, or a list of strings) to a tuple."""
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = [stops]
    stops = tuple(stops)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


def find_stop(text: str, stops: Sequence[str]) -> int:
    """Index of the earliest occurrence of any stop string in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class StopStringHolder:
    """Text in, text out, minus everything from the first stop string on. Holds back the
    longest tail that could still be the beginning of a stop string."""

    def __init__(self, stops: Iterable[str] | str | None):
        self.stops = check_stops(stops)
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        buf = self.held + text
        i = find_stop(buf, self.stops)
        if i >= 0:
            self.held, self.stopped = "", True
            return buf[:i]
        hold = 0  # length of the longest suffix of buf that is a proper prefix of a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.held = buf[len(buf) - hold:]
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        """At the end of generation: held text that turned out not to be a stop string."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out


class TextStream:
    """Token ids in, finished text out: an IncrementalDecoder feeding a StopStringHolder."""

    def __init__(self, tokenizer, context_ids: Sequence[int] = (), stops: Iterable[str] | str | None = ()):
        self.decoder = IncrementalDecoder(tokenizer, context_ids)
        self.holder = StopStringHolder(stops)

    @property
    def stopped(self) -> bool:
        return self.holder.stopped

    def push(self, token_id: int) -> str:
        return self.holder.push(self.decoder.push(token_id))

    def flush(self) -> str:
        return self.holder.push(self.decoder.flush()) + self.holder.flush()


__all__ = ["decode_continuation", "IncrementalDecoder", "check_stops", "find_stop", "StopStringHolder", "TextStream"]
