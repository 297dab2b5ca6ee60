"""Speculative decoding: a small draft model guesses k tokens, the big model checks them in one pass.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling". Batch-1 decoding
reads all the target's weights per token (memory-bound), so scoring k+1 tokens in one forward
costs about as much as scoring one. Each round emits the accepted guesses plus one token of
the target's own, so the output is exactly the target's:
  - greedy: accept guesses while they equal the target's argmax; the first mismatch is
    replaced by the target's argmax (and if all k match, the target's next token is free);
  - sampled: accept guess x with probability min(1, p(x) / q(x)), else resample from
    norm(max(0, p - q)) (Leviathan et al., Algorithm 1): tokens distributed exactly as p, where p
    and q are the distributions `sampling.sample` draws from (temperature, top-k, top-p).

An algorithm on the engine's forward contract (`model.step` over a paged KVCache, model.py):
each model keeps its own cache, and a rejected guess is forgotten with `KVCache.truncate`.
Batch 1. The stop rule is the engine's: a stop id ends the output and is not part of it.
Measured on this project's CPU it is slower than plain decoding for the default model (the draft
costs more than the target calls it saves: docs/annotated/10_speed.md).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch

from ..core.kv_cache import KVCache
from ..core.sampling import distribution


def _run(model, cache: KVCache, tokens: list[int], start: int) -> torch.Tensor:
    # tokens at positions start.. of the one sequence in `cache`: logits (T, V)
    dev = model.tok_embeddings.weight.device
    T = len(tokens)
    positions = (start + torch.arange(T, device=dev))[None]  # (1, T)
    return model.step(torch.tensor([tokens], device=dev), positions, cache.plan([0], [start], [T], T))[0]


@torch.inference_mode()
def speculative_generate(target, draft, prompt: Sequence[int], max_new_tokens: int, *, k: int = 4,
                         temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                         stop_ids: Sequence[int] = (),
                         generator: Optional[torch.Generator] = None) -> tuple[list[int], dict]:
    """(new tokens, stats). Greedy (temperature 0) output equals plain greedy decoding of `target`.
    stats: rounds, proposed, accepted, acceptance_rate, tokens_per_round, target_calls, seconds."""
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if not prompt:
        raise ValueError("prompt: needs at least one token")
    limit = min(target.params.max_seq_len, draft.params.max_seq_len)
    if len(prompt) + max_new_tokens + k > limit:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + k ({k}) exceeds max_seq_len={limit}")
    stops = set(stop_ids)
    t0 = time.perf_counter()
    greedy = temperature <= 0
    target_cache = KVCache.for_model(target, max_tokens=limit)
    draft_cache = KVCache.for_model(draft, max_tokens=limit)

    def probs(logits):  # (n, V) -> what sampling.sample draws from
        return distribution(logits.float(), temperature, top_k, top_p)

    def draw(p):  # (V,) probabilities -> a token id
        return int(torch.multinomial(p, 1, generator=generator))

    def pick(logits):  # (V,) -> the target's token
        return int(logits.argmax()) if greedy else draw(probs(logits[None])[0])

    seq, new = list(prompt), []

    def _round() -> list[int]:
        """One draft-and-verify round: the accepted guesses plus one token of the target's."""
        base = len(seq) - 1  # position of the last token, which the target has not seen
        # 1. the draft guesses k tokens, first feeding what its cache lacks
        guesses, q_rows = [], []
        pos = draft_cache.lengths.get(0, 0)
        feed = seq[pos:]
        for _ in range(k):
            d = _run(draft, draft_cache, feed, pos)[-1]  # (V,)
            pos += len(feed)
            if greedy:
                g = int(d.argmax())
            else:
                q = probs(d[None])[0]
                q_rows.append(q)
                g = draw(q)
            guesses.append(g)
            feed = [g]
        # 2. the target scores the last token and all k guesses in one forward: (k+1, V)
        scored = _run(target, target_cache, [seq[-1]] + guesses, base)
        stats["target_calls"] += 1
        # 3. accept a prefix of the guesses, then one token of the target's own
        out = []
        for i, g in enumerate(guesses):
            if greedy:
                ok = int(scored[i].argmax()) == g
            else:
                p = probs(scored[i:i + 1])[0]
                ok = bool(torch.rand((), generator=generator) < (p[g] / q_rows[i][g]).clamp(max=1.0))
            if not ok:
                break
            out.append(g)
        n = len(out)
        if n < k:  # correction: the target's token where the draft went wrong
            if greedy:
                out.append(int(scored[n].argmax()))
            else:
                residual = (probs(scored[n:n + 1])[0] - q_rows[n]).clamp(min=0)
                out.append(draw(residual / residual.sum()))
        else:  # all k accepted: the target's next token comes free
            out.append(pick(scored[k]))
        stats["rounds"] += 1
        stats["proposed"] += k
        stats["accepted"] += n
        # the caches keep what lies on the accepted path: seq[-1] and the n accepted guesses
        target_cache.truncate(0, base + 1 + n)
        draft_cache.truncate(0, min(draft_cache.lengths[0], base + 1 + n))  # (its last guess was never fed)
        return out
    logits = _run(target, target_cache, seq, 0)[-1]  # prefill: (V,)
    if len(seq) > 1:
        _run(draft, draft_cache, seq[:-1], 0)  # the draft lacks only the last token
    stats = dict(rounds=0, proposed=0, accepted=0, target_calls=1)
    pending = [pick(logits)]  # tokens decided, not yet in seq
    while True:
        for tok in pending:
            if tok in stops or len(new) >= max_new_tokens:
                break
            new.append(tok)
            seq.append(tok)
        else:
            if len(new) < max_new_tokens:
                pending = _round()
                continue
        break
    stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
    stats["tokens_per_round"] = len(new) / max(stats["rounds"], 1)
    stats["seconds"] = time.perf_counter() - t0
    return new, stats
