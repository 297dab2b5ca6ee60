"""From logits to the next token: small pure functions, testable without a model.

The order of operations is HF transformers' logits-processor order, which also contains
Meta's: repetition penalty -> temperature -> top-k -> softmax -> top-p -> draw.

    apply_repetition_penalty(logits, presence, penalty)   HF's RepetitionPenaltyLogitsProcessor
    apply_temperature(logits, temperature)                 logits / T (rows with T == 0 untouched)
    apply_top_k(logits, top_k)                             keep the k largest logits (gpt-fast, lit-llama)
    sample_top_p(probs, p, generator)                      Meta's `sample_top_p`, exactly (REFERENCE b7)
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
from typing import Optional, Sequence, Union

import torch

Setting = Union[float, int, None, torch.Tensor]  # one value for all rows, or a tensor (B,)
Generators = Union[torch.Generator, Sequence[Optional[torch.Generator]], None]


def make_generator(seed: int, device="cpu") -> torch.Generator:
    """A seeded generator: the same seed gives the same draws (torch.multinomial is
    deterministic for a given generator state on one device)."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


# Past this temperature (or penalty) every distribution a model gives is uniform to float32
# precision: a larger value is a typo (1e3 for 1.3), not a setting. NaN and infinities fail too.
MAX_TEMPERATURE = 100.0


def check_sampling_args(temperature=0.6, top_p=0.9, top_k=None, repetition_penalty=1.0):
    """ValueError naming the argument when a setting is out of range (scalars or tensors)."""
    def values(x):
        return x.flatten().tolist() if isinstance(x, torch.Tensor) else [x]
    for t in values(temperature):
        if t is None or not 0 <= t <= MAX_TEMPERATURE:  # NaN fails both comparisons
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}] (0 means greedy), got {t}")
    for p in values(top_p):
        if p is None or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p}")
    for k in values(top_k):
        if k is not None and (not math.isfinite(k) or k < 0 or int(k) != k):
            raise ValueError(f"top_k must be a positive integer (or 0/None for no limit), got {k}")
    for r in values(repetition_penalty):
        if r is None or not 0 < r <= MAX_TEMPERATURE:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_TEMPERATURE:g}] (1.0 means none), got {r}")


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


__all__ = ["make_generator", "check_sampling_args", "token_presence", "apply_repetition_penalty",
           "apply_temperature", "apply_top_k", "top_p_mask", "sample_top_p", "greedy", "logits_to_probs",
           "sample"]
