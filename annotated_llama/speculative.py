"""Speculative decoding: a small draft model guesses k tokens, the big model checks them in one pass.

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding";
Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling". Batch-1 decoding
reads all the target's weights per token (memory-bound), so scoring k+1 tokens in one forward
costs about as much as scoring one. Each round emits the accepted guesses plus one token of
the target's own, so the output is exactly the target's:
  - greedy: accept guesses while they equal the target's argmax; the first mismatch is
    replaced by the target's argmax (and if all k match, the target's next token is free);
  - sampled: accept guess x with probability min(1, p(x) / q(x)), else resample from
    norm(max(0, p - q)) (Leviathan et al., Algorithm 1): tokens distributed exactly as p.

Both models keep Meta's KV-cache semantics (`model(tokens, start_pos)`): a rejected guess
needs no rollback, because the next call's start_pos overwrites its slot before any query
attends to it. Batch 1 only.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import torch


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits.float() / temperature, dim=-1)


@torch.no_grad()
def speculative_generate(target, draft, prompt: Sequence[int], max_new_tokens: int, *, k: int = 4,
                         temperature: float = 0.0, stop_ids: Sequence[int] = (),
                         generator: Optional[torch.Generator] = None) -> tuple[list[int], dict]:
    """(new tokens, stats). Greedy (temperature 0) output equals plain greedy decoding of `target`.
    stats: rounds, proposed, accepted, acceptance_rate, tokens_per_round, target_calls, seconds."""
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k}")
    if not prompt:
        raise ValueError("prompt: needs at least one token")
    device = next(target.parameters()).device
    limit = min(target.params.max_seq_len, draft.params.max_seq_len)
    if len(prompt) + max_new_tokens + k > limit:
        raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) + k ({k}) exceeds max_seq_len={limit}")
    stops = set(stop_ids)
    t0 = time.perf_counter()
    greedy = temperature <= 0

    def pick(logits):  # (V,) -> token id from the target's distribution
        if greedy:
            return int(logits.argmax())
        return int(torch.multinomial(_probs(logits, temperature), 1, generator=generator))

    seq = list(prompt)
    tgt_logits = target(torch.tensor([seq], device=device), 0)[0, -1]  # prefill: (V,)
    draft(torch.tensor([seq], device=device), 0)
    seq.append(pick(tgt_logits))
    n_draft = len(prompt)  # slots [0, n_draft) of the draft's cache agree with seq
    new = [seq[-1]]
    stats = dict(rounds=0, proposed=0, accepted=0, target_calls=1)

    while len(new) < max_new_tokens and new[-1] not in stops:
        # 1. the draft guesses k tokens, feeding first what its cache lacks (1 or 2 tokens)
        base = len(seq) - 1  # slot of the last token, which neither cache holds yet
        guesses, q_rows = [], []
        feed, pos = seq[n_draft:], n_draft
        for _ in range(k):
            logits = draft(torch.tensor([feed], device=device), pos)[0, -1]  # (V,)
            pos += len(feed)
            if greedy:
                g = int(logits.argmax())
            else:
                q = _probs(logits, temperature)
                q_rows.append(q)
                g = int(torch.multinomial(q, 1, generator=generator))
            guesses.append(g)
            feed = [g]
        # 2. the target scores the last token and all k guesses in one forward: (k+1, V)
        tgt = target(torch.tensor([[seq[-1]] + guesses], device=device), base)[0]
        stats["target_calls"] += 1
        # 3. accept a prefix of the guesses, then one token of the target's own
        n = 0
        out = []
        for i, g in enumerate(guesses):
            if greedy:
                ok = int(tgt[i].argmax()) == g
            else:
                p = _probs(tgt[i], temperature)
                ratio = (p[g] / q_rows[i][g]).clamp(max=1.0)
                ok = bool(torch.rand((), generator=generator, device=ratio.device) < ratio)
            if not ok:
                break
            out.append(g)
            n += 1
        if n < k:  # correction: the target's token where the draft went wrong
            if greedy:
                out.append(int(tgt[n].argmax()))
            else:
                residual = (_probs(tgt[n], temperature) - q_rows[n]).clamp(min=0)
                out.append(int(torch.multinomial(residual / residual.sum(), 1, generator=generator)))
        else:  # all k accepted: the target's next token comes free
            out.append(pick(tgt[k]))
        stats["rounds"] += 1
        stats["proposed"] += k
        stats["accepted"] += n
        # the draft's cache holds seq[-1] and guesses[:k-1]; keep the slots still on the path
        n_draft = base + 1 + min(n, k - 1)
        for tok in out:
            if len(new) >= max_new_tokens:
                break
            seq.append(tok)
            new.append(tok)
            if tok in stops:
                break
    stats["acceptance_rate"] = stats["accepted"] / max(stats["proposed"], 1)
    stats["tokens_per_round"] = (len(new) - 1) / max(stats["rounds"], 1)
    stats["seconds"] = time.perf_counter() - t0
    return new, stats


@torch.no_grad()
def greedy_generate(model, prompt: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
    """Plain one-token-at-a-time greedy decoding: the reference speculative decoding must equal."""
    device = next(model.parameters()).device
    logits = model(torch.tensor([list(prompt)], device=device), 0)[0, -1]
    new, pos = [], len(prompt)
    while True:
        tok = int(logits.argmax())
        new.append(tok)
        if len(new) >= max_new_tokens or tok in set(stop_ids):
            return new
        logits = model(torch.tensor([[tok]], device=device), pos)[0, -1]
        pos += 1
