"""argparse types for every numeric and device flag: the one place their ranges are checked.

A number that is out of range is refused while the command line is parsed, before anything
loads, in argparse's words: `annotated-llama generate: error: argument --seed: must be an integer
in [0, 2**64), got 1e30`. `float("nan")`, `float("inf")` and `int("9" * 5000)` all parse in
Python, and each once reached a traceback deep inside torch (a NaN penalty, an infinite
temperature, "Overflow when unpacking long long" from a seed past 64 bits).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys

from ..core.sampling import LIMITS

INT64_MAX = (1 << 63) - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except (ValueError, TypeError):  # also int("9" * 5000): Python refuses 4,300+ digits
        raise argparse.ArgumentTypeError(f"expected an integer, got {str(text)[:40]!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected a number, got {str(text)[:40]!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {str(text)[:40]!r}")
    return value


def int_range(lo: int, hi: int = INT64_MAX):
    """An int type accepting lo <= value <= hi."""
    def parse(text):
        value = _int(text)
        if not lo <= value <= hi:
            upper = "" if hi == INT64_MAX else f" and at most {hi:,}"
            raise argparse.ArgumentTypeError(f"must be an integer of at least {lo}{upper}, got {str(text)[:40]}")
        return value
    parse.__name__ = f"int in [{lo}, {hi}]"
    parse.kind, parse.lo, parse.hi = "int", lo, hi  # for the tests that enumerate every flag
    return parse


def float_range(lo: float, hi: float = math.inf, *, lo_open: bool = False):
    """A finite float type accepting lo <= value <= hi (lo < value with lo_open)."""
    def parse(text):
        value = _float(text)
        if value < lo or (lo_open and value == lo) or value > hi:
            low = f"above {lo:g}" if lo_open else f"at least {lo:g}"
            high = "" if hi == math.inf else f" and at most {hi:g}"
            raise argparse.ArgumentTypeError(f"must be {low}{high}, got {text}")
        return value
    parse.__name__ = f"float in [{lo}, {hi}]"
    parse.kind, parse.lo, parse.hi, parse.lo_open = "float", lo, hi, lo_open
    return parse


positive_int = int_range(1)
nonnegative_int = int_range(0)
finite_float = float_range(-math.inf)
positive_float = float_range(0.0, lo_open=True)
nonnegative_float = float_range(0.0)
probability = float_range(0.0, 1.0)  # [0, 1]


def sampling(name: str):
    """The type of a sampling flag, its range the one of sampling.LIMITS (the engine's own check)."""
    low, high, closed = LIMITS[name]
    if isinstance(low, int):
        return int_range(low if closed else low + 1, high)
    return float_range(low, high, lo_open=not closed)


temperature = sampling("temperature")  # [0, 2]: 0 is greedy
top_p = sampling("top_p")  # (0, 1]
top_k = sampling("top_k")  # 0: no limit
repetition_penalty = sampling("repetition_penalty")


def seed(text: str) -> int:
    """A seed in [0, 2**64): what torch.Generator.manual_seed accepts."""
    value = _int(text)
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**64), got {str(text)[:40]}")
    return value


seed.kind, seed.lo, seed.hi = "int", 0, (1 << 64) - 1


def device(text: str) -> str:
    """cpu, cuda or cuda:N, refused unless it exists on this machine."""
    name = str(text).strip().lower()
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d{1,4}))?", name)
    if not match:
        raise argparse.ArgumentTypeError(f"{str(text)[:40]!r} is not a device (use cpu, cuda or cuda:N)")
    import torch

    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name}: no CUDA device is available here (use cpu)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                         f"numbered from 0")
    return name


def utf8_text(text: str) -> str:
    """Text from the command line that is valid Unicode: invalid UTF-8 in argv reaches Python as
    lone surrogates (PEP 383), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise argparse.ArgumentTypeError(f"not valid UTF-8 text (character {e.start}: "
                                         f"{text[e.start]!r})") from None
    return text


def decode_utf8(data: bytes, what: str = "stdin") -> str:
    """`data` as UTF-8, or ValueError naming `what` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start:,})") from None


def read_stdin(line: bool = False) -> str:
    """All of stdin (or one line of it), decoded strictly as UTF-8; "" at the end of input."""
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # already a text stream (an embedding program's, a test's StringIO)
        return sys.stdin.readline() if line else sys.stdin.read()
    return decode_utf8(buffer.readline() if line else buffer.read(), "stdin")


def config_from_args(cls, args, **overrides):
    """A config dataclass (TrainConfig, FinetuneConfig) from the parsed flags of the same names
    (--max-steps -> max_steps), so a field is never copied by hand; `overrides` for the rest."""
    given = vars(args)
    return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}, **overrides)
