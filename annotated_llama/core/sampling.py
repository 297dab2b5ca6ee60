"""From logits to the next token: small pure functions, testable without a model.

The order of operations is HF transformers' logits-processor order, which also contains
Meta's: repetition penalty -> temperature -> top-k -> softmax -> top-p -> draw.

    SamplingParams                                        every setting of one request, checked in one place
    apply_repetition_penalty(logits, presence, penalty)   HF's RepetitionPenaltyLogitsProcessor
    apply_openai_penalties(logits, counts, presence, freq) OpenAI's presence and frequency penalties
    apply_logit_bias(logits, bias)                        OpenAI's logit_bias (HF's SequenceBias, one token)
    apply_temperature(logits, temperature)                 logits / T (rows with T == 0 untouched)
    apply_top_k(logits, top_k)                             keep the k largest logits (gpt-fast, lit-llama)
    sample_top_p(probs, p, generator)                      Meta's `sample_top_p`, exactly (meta-llama/llama generation.py)
    greedy(logits)                                         argmax (Meta's temperature == 0 branch)
    sample(logits, temperature, top_p, top_k, ...)         all of the above for a batch of rows

Every setting may be one number for the whole batch or a tensor (B,) with one value per row,
so a batching server can mix requests with different settings in one call; `generator` may
be one `torch.Generator` or a list with one per row (per-request seeds: a row's draws then
do not depend on which other rows share the batch). Rows whose temperature is 0 are greedy.

Shapes: B rows, V vocabulary. `logits` are float (B, V); the returned tokens are LongTensor (B,).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Sequence, Union

import torch

Setting = Union[float, int, None, torch.Tensor]  # one value for all rows, or a tensor (B,)
Generators = Union[torch.Generator, Sequence[Optional[torch.Generator]], None]


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """A seeded generator: the same seed gives the same draws (torch.multinomial is
    deterministic for a given generator state on one device)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# ---- the settings of one request -----------------------------------------------------------
# The one source of truth for their ranges: (low, high, low inclusive). OpenAI's API reference
# gives temperature [0, 2], penalties [-2, 2], logit_bias [-100, 100]; the rest are ours. The
# server's request schema derives its ranges from these (openai_schema.py).
LIMITS = {
    "temperature": (0.0, 2.0, True),
    "top_p": (0.0, 1.0, False),
    "top_k": (0, 1 << 31, True),
    "repetition_penalty": (0.0, 10.0, False),
    "presence_penalty": (-2.0, 2.0, True),
    "frequency_penalty": (-2.0, 2.0, True),
    "logit_bias": (-100.0, 100.0, True),
    "seed": (0, (1 << 64) - 1, True),
    "max_tokens": (1, 1 << 31, True),
    "logprobs": (0, 20, True),
}


# Settings the logits are divided by: a positive value below SMALLEST[name] (5e-324, a subnormal)
# makes logit / value overflow float32 to inf, and the softmax of inf - inf is NaN. 1e-6 keeps
# |logit| / value < 1e8 for any logit a model or logit_bias (+-100) can produce.
SMALLEST = {"temperature": 1e-6, "repetition_penalty": 1e-6}


def check_range(name: str, value) -> None:
    """ValueError naming `name` unless `value` is a finite number within LIMITS[name] (and, for
    a divisor of the logits, 0 or at least SMALLEST[name])."""
    low, high, closed = LIMITS[name]
    integer = isinstance(low, int)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            integer and math.isfinite(value) and int(value) != value):  # (int(nan) raises: NaN is refused below)
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value) or not (low <= value if closed else low < value) or value > high:
        raise ValueError(f"{name} must be in {'[' if closed else '('}{low}, {high}], got {value!r}")
    if 0 < value < SMALLEST.get(name, 0):
        raise ValueError(f"{name} must be {'0 or ' if closed else ''}at least {SMALLEST[name]}, got {value!r}")


@dataclass
class SamplingParams:
    """Every setting of one generation request, for every front end (Llama, the CLI, the server).

    The defaults are Meta's (`Llama.generate`); the OpenAI server passes OpenAI's. Penalties in the
    order the engine applies them: repetition (HF/CTRL, over prompt and output), then presence and
    frequency (OpenAI, over the output so far), then logit_bias, then `constraint` (a grammar that
    masks tokens), then temperature, top-k, top-p and the draw.
    """
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    top_k: int = 0  # 0: no limit
    max_tokens: Optional[int] = None  # None: up to the end of the context
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict = field(default_factory=dict)  # {token id: bias added to its logit}
    seed: Optional[int] = None  # None: drawn from the engine's own generator
    stop: tuple = ()  # strings; the text ends before the first one
    ignore_eos: bool = False  # keep going past the tokenizer's stop ids
    logprobs: Optional[int] = None  # report each token's log-probability and this many alternatives
    prompt_logprobs: bool = False  # also the log-probability of every prompt token (echo)
    # a factory: called once per sequence (Engine.add; each of n forks gets its own), it returns a
    # fresh grammar state with apply(logits_row) / advance(token) / is_finished() (structured_output.py)
    constraint: Optional[Callable[[], Any]] = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            check_range(name, getattr(self, name))
        if self.top_k is None:
            self.top_k = 0
        check_range("top_k", self.top_k)
        for name in ("max_tokens", "seed", "logprobs"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name))
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            check_range("logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes) -> "SamplingParams":
        return SamplingParams(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def check_sampling_args(temperature=0.6, top_p=0.9, top_k=None, repetition_penalty=1.0):
    """ValueError naming the argument when a setting is out of range (scalars or tensors)."""
    def values(x):
        return x.flatten().tolist() if isinstance(x, torch.Tensor) else [x]
    for name, setting in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        for value in values(setting):
            check_range(name, value)
    for k in values(top_k):
        if k is not None:
            check_range("top_k", k)


def _per_row(x: Setting, B: int, like: torch.Tensor) -> torch.Tensor:
    # a setting as a (B, 1) float column on the logits' device, for broadcasting over V
    t = torch.as_tensor(x, dtype=torch.float32, device=like.device)
    return t.expand(B).reshape(B, 1) if t.dim() == 0 else t.reshape(B, 1)


# ---- logits processors -------------------------------------------------------------------

def token_presence(ids: torch.Tensor, vocab_size: int, pad_id: int = -1) -> torch.Tensor:
    """Bool (B, V): which tokens occur in each row of `ids` (B, L); `pad_id` entries ignored."""
    valid = ids != pad_id  # (B, L)
    counts = torch.zeros(ids.shape[0], vocab_size, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=0), valid.float())  # pads add 0 at index 0
    return counts > 0


def apply_repetition_penalty(logits: torch.Tensor, presence: torch.Tensor, penalty: Setting) -> torch.Tensor:
    """HF semantics (CTRL, Keskar et al. 2019, eq. in section 4.1 as implemented by HF):
    for every token already in the row (prompt included), a positive logit is divided by the
    penalty and a negative one multiplied by it, so penalty > 1 always lowers its chance."""
    if not isinstance(penalty, torch.Tensor) and penalty == 1.0:
        return logits
    r = _per_row(penalty, logits.shape[0], logits)  # (B, 1)
    penalized = torch.where(logits < 0, logits * r, logits / r)
    return torch.where(presence, penalized, logits)


def apply_openai_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: Setting,
                           frequency: Setting) -> torch.Tensor:
    """OpenAI's presence and frequency penalties (API reference, "Parameter details"):
    logit[j] -= frequency * count[j] + presence * (count[j] > 0), count over the tokens generated
    so far. counts: float (B, V)."""
    f = _per_row(frequency, logits.shape[0], logits)  # (B, 1)
    p = _per_row(presence, logits.shape[0], logits)
    return logits - f * counts - p * (counts > 0).float()


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Add a bias (B, V) to the logits: OpenAI's logit_bias, HF's SequenceBiasLogitsProcessor for
    one-token sequences. A bias of -100 all but bans a token; +100 all but forces it."""
    return logits + bias


def apply_temperature(logits: torch.Tensor, temperature: Setting) -> torch.Tensor:
    """logits / T. Rows with T == 0 are left as they are (they are decoded greedily)."""
    t = _per_row(temperature, logits.shape[0], logits)  # (B, 1)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def apply_top_k(logits: torch.Tensor, top_k: Setting) -> torch.Tensor:
    """Keep each row's k largest logits, set the rest to -inf (gpt-fast's `logits_to_probs`).
    k = 0 or None: no limit. Ties with the k-th value are kept, as in gpt-fast."""
    if top_k is None or (not isinstance(top_k, torch.Tensor) and top_k == 0):
        return logits
    B, V = logits.shape
    k = torch.as_tensor(top_k, device=logits.device).long().expand(B) if not isinstance(top_k, torch.Tensor) \
        else top_k.to(logits.device).long().reshape(B)
    k = torch.where(k <= 0, torch.full_like(k, V), k.clamp(max=V))  # (B,)
    largest = torch.topk(logits, int(k.max()), dim=-1).values  # (B, k_max), descending
    kth = largest.gather(1, (k - 1)[:, None])  # (B, 1): each row's k-th largest value
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(probs_sort: torch.Tensor, p: Setting) -> torch.Tensor:
    """Bool mask of the sorted (descending) probabilities that top-p drops: those whose
    preceding mass already exceeds p. The token that crosses p, and the first token, stay."""
    p = _per_row(p, probs_sort.shape[0], probs_sort)  # (B, 1)
    probs_sum = torch.cumsum(probs_sort, dim=-1)  # (B, V)
    return probs_sum - probs_sort > p


def sample_top_p(probs: torch.Tensor, p: Setting, generator: Generators = None) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2019) exactly as Meta's `sample_top_p`: sort, zero the
    tail beyond mass p, renormalise, draw one token, map back to vocabulary ids. Returns (B,)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (B, V) each
    probs_sort = probs_sort.masked_fill(top_p_mask(probs_sort, p), 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    choice = _multinomial(probs_sort, generator)  # (B, 1): index into the sorted order
    return torch.gather(probs_idx, -1, choice)[:, 0]


def _multinomial(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, num_samples=1, generator=generator)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {probs.shape[0]} rows")
    # one generator per row: each row's draw depends only on its own generator's state
    return torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g) for i, g in enumerate(generator)])


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row (B,); ties go to the lowest id, as in torch.argmax/HF."""
    return torch.argmax(logits, dim=-1)


# ---- the whole step ------------------------------------------------------------------------

def logits_to_probs(logits: torch.Tensor, temperature: Setting = 1.0, top_k: Setting = None) -> torch.Tensor:
    """softmax(top_k(logits / T)) in float32: the distribution top-p then truncates."""
    logits = apply_top_k(apply_temperature(logits.float(), temperature), top_k)
    return torch.softmax(logits, dim=-1)


def distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: Setting = None, top_p: Setting = 1.0) -> torch.Tensor:
    """The probabilities (B, V) that `sample` draws from at temperature > 0: softmax(top_k(logits /
    T)) cut to the top-p nucleus and renormalised (speculative decoding's target and draft)."""
    probs = logits_to_probs(logits, temperature, top_k)  # (B, V)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sort = probs_sort.masked_fill(top_p_mask(probs_sort, 1.0 if top_p is None else top_p), 0.0)
    kept = torch.zeros_like(probs).scatter(1, probs_idx, probs_sort)  # back to vocabulary order
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, temperature: Setting = 0.6, top_p: Setting = 0.9, top_k: Setting = None, *,
           generator: Generators = None, presence: Optional[torch.Tensor] = None,
           repetition_penalty: Setting = 1.0) -> torch.Tensor:
    """The next token of each row (B,) from logits (B, V).

    temperature 0 is greedy (argmax after the repetition penalty). `presence` (B, V) marks the
    tokens the penalty applies to (see `token_presence`). Per-row settings may be tensors (B,).
    """
    logits = logits.float()
    if presence is not None:
        logits = apply_repetition_penalty(logits, presence, repetition_penalty)
    t = torch.as_tensor(temperature, dtype=torch.float32)
    if t.dim() == 0 and t.item() == 0:  # the whole batch is greedy: no softmax, no RNG draw
        return greedy(logits)
    probs = logits_to_probs(logits, temperature, top_k)  # (B, V)
    drawn = sample_top_p(probs, 1.0 if top_p is None else top_p, generator)  # (B,)
    if t.dim() == 0:
        return drawn
    return torch.where(t.to(logits.device) == 0, greedy(logits), drawn)  # mixed greedy/sampled rows


__all__ = ["SamplingParams", "LIMITS", "SMALLEST", "check_range", "make_generator", "check_sampling_args",
           "apply_openai_penalties", "apply_logit_bias", "token_presence", "apply_repetition_penalty",
           "apply_temperature", "apply_top_k", "top_p_mask", "sample_top_p", "greedy", "logits_to_probs", "distribution",
           "sample"]
