"""The inference engine: the one decode loop under every front end.

`Llama.generate`, the CLI, the server's scheduler, instruction evaluation and tensor parallelism
all add requests here and read tokens back, as vLLM's `LLMEngine` serves both its offline `LLM`
class and its OpenAI server. Each `step()` is one iteration of continuous batching (Yu et al.
2022, "Orca", section 3: iteration-level scheduling):

  admit    waiting requests join while there is a free row and their worst case (prompt +
           max_tokens) fits the cache budget; one whose worst case can never fit is refused
           when it is added;
  prefill  the next chunk of every new prompt, the rows ragged in one forward call (each row
           at its own positions, padding written to the cache's scratch block), so a long prompt
           never stalls the running rows for more than one chunk;
  decode   one token for every running request, in one forward call, each row at its own
           position, reading its own blocks of the paged KV cache (kv_cache.py);
  sample   each row with its own settings (sampling.SamplingParams): the tokenizer's vocabulary
           clip, penalties, logit bias, a grammar's mask, temperature, top-k, top-p, and a draw
           from the row's own generator (so a row's tokens do not depend on its neighbours);
  finish   the one stop rule: a stop id (not part of the output, as in Meta's generate), a stop
           string (the text ends before it), a finished grammar, or the token budget; its
           blocks go back to the cache at once.

The forward call is `runner(tokens, positions, cache_batch, logits_at)`, by default the model's
own `step` (model.py); backends.py supplies the compiled one and tensor parallelism its leader.
"""

from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..core.kv_cache import CacheFull, ContextFull, KVCache
from ..core.sampling import (SamplingParams, apply_logit_bias, apply_openai_penalties, apply_repetition_penalty,
                       make_generator, sample)
from .streaming import TextStream

PREFILL_CHUNK = 512  # prompt tokens per row and forward call: bounds the activations' memory


@dataclass
class Output:
    """What one step produced for one request: a token and its text, or (token None) the end."""
    seq: "Sequence"
    token: Optional[int]
    text: str = ""
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token id, logprob)], most likely first
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled", on the last output


class Sequence:
    """One request inside the engine: its prompt, its position in the cache, what it produced."""

    def __init__(self, seq_id, prompt: list[int], params: SamplingParams, budget: int, generator, tokenizer):
        self.id, self.prompt, self.params, self.budget = seq_id, list(prompt), params, budget
        self.generator = generator
        self.output: list[int] = []
        self.logprobs: list[float] = []  # of each output token, when params.logprobs is set
        self.top_logprobs: list[list] = []
        self.prompt_logprobs: list[Optional[float]] = []  # with params.prompt_logprobs: first is None
        self.prompt_top_logprobs: list[Optional[list]] = []
        self.text = TextStream(tokenizer, prompt, params.stop)
        self.pieces: list[str] = []
        self.cached = 0  # positions written to the KV cache
        self.next_token: Optional[int] = None  # sampled, not yet fed back
        self.finish_reason: Optional[str] = None
        self.leader: Optional[Sequence] = None  # n > 1: the sequence whose prefill this one shares
        self.counts: Optional[torch.Tensor] = None  # (V,) output token counts, for the penalties
        self.seen: Optional[torch.Tensor] = None  # (V,) prompt and output tokens, repetition penalty
        self.bias: Optional[torch.Tensor] = None  # (V,) logit bias
        self.constraint = params.constraint() if params.constraint is not None else None  # its own grammar state
        self.added = time.perf_counter()
        self.first_token_at: Optional[float] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def reserve(self) -> int:  # the most cache positions it can reach
        return len(self.prompt) + self.budget

    def generated_text(self) -> str:
        return "".join(self.pieces)


class Engine:
    """`Engine(model, tokenizer, max_batch_size=8)`; `add(prompt_ids, SamplingParams(...))`; call
    `step()` until `has_work` is false (or `run(...)` for the whole batch). kv_tokens: the cache
    budget in token positions (default max_batch_size x the context; memory is only taken as tokens
    arrive). seed: the generator that seeds requests without a seed."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, kv_tokens: Optional[int] = None,
                 block_size: int = 16, prefill_chunk: int = PREFILL_CHUNK, seed: int = 1,
                 runner: Optional[Callable] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = model.params.max_seq_len
        self.vocab = min(tokenizer.n_words, model.params.vocab_size)  # never sample ids the tokenizer lacks
        self.device = model.tok_embeddings.weight.device
        self.max_batch_size, self.prefill_chunk = max_batch_size, prefill_chunk
        self.kv_tokens = kv_tokens or max_batch_size * self.max_seq_len
        self.cache = KVCache.for_model(model, max_tokens=self.kv_tokens, block_size=block_size)
        self.runner = runner or model.step
        self.generator = make_generator(seed)  # on the CPU: it only draws other generators' seeds
        self.stop_ids = frozenset(tokenizer.stop_ids)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count()
        # counters (read by /health and /metrics, tests and benchmarks)
        self.forward_calls = self.steps = self.prefills = self.tokens_generated = self.batch_rows = 0
        self.max_batch_seen = 0

    # ---- requests --------------------------------------------------------------------------

    def check(self, prompt: list[int], params: SamplingParams, exact: bool = False) -> int:
        """The one context check: ValueError for a request that can never run, else its budget of new
        tokens: max_tokens cut to the context (Meta's generate), or with `exact` ContextFull (OpenAI's)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if len(prompt) == 0:
            raise ValueError("the prompt is empty: it needs at least one token (e.g. BOS)")
        if exact and len(prompt) + (params.max_tokens or 1) > self.max_seq_len:
            raise ContextFull(self.max_seq_len, len(prompt), params.max_tokens or 1)
        if len(prompt) >= self.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context is {self.max_seq_len} tokens: "
                             "no room to generate (shorten the prompt or raise max_seq_len)")
        if min(prompt) < 0 or max(prompt) >= self.model.params.vocab_size:
            raise ValueError(f"the prompt has a token id outside [0, {self.model.params.vocab_size})")
        budget = min(params.max_tokens or self.max_seq_len, self.max_seq_len - len(prompt))
        if self.cache.blocks_needed(len(prompt) + budget) > self.cache.max_blocks - 1:
            raise ValueError(f"the prompt ({len(prompt)} tokens) + max_tokens ({budget}) exceed the KV "
                             f"budget of {self.kv_tokens} tokens")
        return budget

    def add(self, prompt: list[int], params: SamplingParams, n: int = 1) -> list[Sequence]:
        """Queue a request; n > 1 samples n completions that share one prefill of the prompt.
        Seeds: `params.seed` (+ i for the i-th of n) or, without one, drawn from the engine's
        generator, so a seeded request gives the same tokens whatever else is in the batch."""
        budget = self.check(list(prompt), params)
        if params.seed is not None:
            seeds = [params.seed + i for i in range(n)]
        else:
            seeds = torch.randint(0, 1 << 62, (n,), generator=self.generator).tolist()
        seqs = [Sequence(next(self._ids), prompt, params, budget, make_generator(s, self.device), self.tokenizer)
                for s in seeds]
        for s in seqs[1:]:
            s.leader = seqs[0]
        self.waiting.extend(seqs)
        return seqs

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` now (its client went away) and give its blocks back."""
        if not seq.done:
            self._finish(seq, "cancelled")
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
            on_output: Optional[Callable[[Output], None]] = None) -> list[Sequence]:
        """Generate for every prompt to the end (the batch front ends: Llama, evaluation)."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add(p, sp)[0] for p, sp in zip(prompts, per_prompt)]
        while self.has_work:
            for out in self.step():
                if on_output is not None:
                    on_output(out)
        return seqs

    # ---- one iteration ---------------------------------------------------------------------

    def step(self) -> list[Output]:
        outputs: list[Output] = []
        self._admit()
        for s in self.running:  # a fork whose leader is gone or already past its prefill prefills alone
            if s.leader is not None and (s.leader.done or s.leader.cached >= len(s.leader.prompt)):
                s.leader = None
        todo = [s for s in self.running if s.cached < len(s.prompt) and s.leader is None]
        ready = [s for s in self.running if s.next_token is not None and not s.done]
        if todo:
            outputs += self._prefill(todo)
        if ready:
            outputs += self._decode(ready)
        self.running = [s for s in self.running if not s.done]
        return outputs

    def _admit(self) -> None:
        reserved = sum(self.cache.blocks_needed(s.reserve) for s in self.running)
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            need = self.cache.blocks_needed(seq.reserve)
            if reserved + need > self.cache.max_blocks - 1 and self.running:
                return  # first come, first served: the head waits for room
            self.waiting.popleft()
            self.running.append(seq)
            reserved += need

    def _forward(self, tokens, positions, batch, logits_at):
        self.forward_calls += 1
        return self.runner(tokens, positions, batch, logits_at)

    def _prefill(self, seqs: list[Sequence]) -> list[Output]:
        counts = [min(len(s.prompt) - s.cached, self.prefill_chunk) for s in seqs]
        B, T = len(seqs), max(counts)
        tokens = torch.zeros(B, T, dtype=torch.long)  # right-padded; the padding writes the scratch block
        positions = torch.zeros(B, T, dtype=torch.long)
        for b, (s, n) in enumerate(zip(seqs, counts)):
            tokens[b, :n] = torch.tensor(s.prompt[s.cached:s.cached + n])
            positions[b, :n] = torch.arange(s.cached, s.cached + n)
        batch = self.cache.plan([s.id for s in seqs], [s.cached for s in seqs], counts, T)
        every = any(s.params.prompt_logprobs for s in seqs)  # echo + logprobs: every position's logits
        last = torch.tensor([n - 1 for n in counts])
        logits = self._forward(tokens.to(self.device), positions.to(self.device), batch,
                               None if every else last.to(self.device))  # (B, T, V) or (B, V)
        self.prefills += 1
        if every:
            for b, s in enumerate(seqs):
                if s.params.prompt_logprobs:
                    self._prompt_logprobs(s, logits[b, :counts[b]])
            logits = logits[torch.arange(B), last]  # (B, V)
        rows, row_logits = [], []
        for b, (s, n) in enumerate(zip(seqs, counts)):
            s.cached += n
            if s.cached == len(s.prompt):  # the whole prompt is in: its first token, and its forks'
                group = [s] + [f for f in self.running if f.leader is s]
                for f in group[1:]:
                    self.cache.fork(s.id, f.id)
                    f.cached, f.leader = s.cached, None
                    f.prompt_logprobs, f.prompt_top_logprobs = s.prompt_logprobs, s.prompt_top_logprobs
                rows += group
                row_logits += [b] * len(group)
        return self._sample(rows, logits[torch.tensor(row_logits, dtype=torch.long)]) if rows else []

    def _decode(self, seqs: list[Sequence]) -> list[Output]:
        B = len(seqs)
        tokens = torch.tensor([[s.next_token] for s in seqs], device=self.device)  # (B, 1)
        positions = torch.tensor([[s.cached] for s in seqs], device=self.device)  # (B, 1)
        batch = self.cache.plan([s.id for s in seqs], [s.cached for s in seqs], [1] * B, 1)
        logits = self._forward(tokens, positions, batch, torch.zeros(B, dtype=torch.long, device=self.device))
        for s in seqs:
            s.cached += 1
        self.steps += 1
        self.batch_rows += B
        self.max_batch_seen = max(self.max_batch_seen, B)
        return self._sample(seqs, logits)

    def _prompt_logprobs(self, s: Sequence, logits: torch.Tensor) -> None:
        # log p(prompt[j] | prompt[:j]) from the logits at j - 1 (the first token has none)
        lp = F.log_softmax(logits[:, :self.vocab].float(), dim=-1)  # (n, V)
        start = s.cached
        targets = torch.tensor(s.prompt[start + 1:start + 1 + lp.shape[0]], device=lp.device)
        if start == 0:
            s.prompt_logprobs.append(None)
            s.prompt_top_logprobs.append(None)
        chosen = lp[:len(targets)].gather(1, targets[:, None])[:, 0].tolist()
        k = s.params.logprobs or 0
        tops = _top(lp[:len(targets)], k)
        s.prompt_logprobs += chosen
        s.prompt_top_logprobs += tops

    # ---- sampling and the stop rule ----------------------------------------------------------

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        """One token per row of logits (n, V_model), each row with its own request's settings."""
        logits = logits[:, :self.vocab].float()  # a padded embedding: never ids the tokenizer lacks
        raw = logits
        ps = [s.params for s in seqs]
        if any(p.penalized for p in ps):
            logits = self._penalize(seqs, logits)
        if any(p.logit_bias for p in ps):
            logits = apply_logit_bias(logits, torch.stack([self._bias(s) for s in seqs]))
        if any(s.constraint is not None for s in seqs):  # each row masked by its own grammar state
            logits = logits.clone()
            for i, s in enumerate(seqs):
                if s.constraint is not None:
                    s.constraint.apply(logits[i])
        if all(p.greedy for p in ps):
            tokens = torch.argmax(logits, dim=-1)
        else:
            tokens = sample(logits, temperature=_setting([p.temperature for p in ps]),
                            top_p=_setting([p.top_p for p in ps]), top_k=_setting([p.top_k for p in ps]),
                            generator=[s.generator for s in seqs])
        want = [i for i, p in enumerate(ps) if p.logprobs is not None]
        chosen, tops = {}, {}
        if want:
            lp = F.log_softmax(raw[want], dim=-1)  # Meta's and OpenAI's logprobs: the model's distribution
            picked = lp.gather(1, tokens[want][:, None])[:, 0].tolist()
            for j, i in enumerate(want):
                chosen[i] = picked[j]
                tops[i] = _top(lp[j:j + 1], ps[i].logprobs)[0]
        outputs = []
        for i, (s, token) in enumerate(zip(seqs, tokens.tolist())):
            outputs.append(self._take(s, token, chosen.get(i), tops.get(i)))
        return outputs

    def _penalize(self, seqs, logits):
        V = logits.shape[1]
        for s in seqs:
            if s.params.penalized and s.counts is None:
                s.counts = torch.zeros(V, device=logits.device)
                s.seen = torch.zeros(V, dtype=torch.bool, device=logits.device)
                s.seen[torch.tensor([t for t in s.prompt if t < V], dtype=torch.long, device=logits.device)] = True
                for t in s.output:
                    s.counts[t] += 1
                    s.seen[t] = True
        zeros_f, zeros_b = torch.zeros(V, device=logits.device), torch.zeros(V, dtype=torch.bool, device=logits.device)
        seen = torch.stack([s.seen if s.seen is not None else zeros_b for s in seqs])  # (n, V)
        counts = torch.stack([s.counts if s.counts is not None else zeros_f for s in seqs])  # (n, V)
        logits = apply_repetition_penalty(logits, seen, _setting([s.params.repetition_penalty for s in seqs]))
        return apply_openai_penalties(logits, counts, _setting([s.params.presence_penalty for s in seqs]),
                                      _setting([s.params.frequency_penalty for s in seqs]))

    def _bias(self, s: Sequence) -> torch.Tensor:
        if s.bias is None:
            s.bias = torch.zeros(self.vocab, device=self.device)
            for token, b in s.params.logit_bias.items():
                if token < self.vocab:
                    s.bias[token] = float(b)
        return s.bias

    def _take(self, s: Sequence, token: int, logprob, top) -> Output:
        self.tokens_generated += 1
        if s.first_token_at is None:
            s.first_token_at = time.perf_counter()
        p = s.params
        if token in self.stop_ids and not p.ignore_eos:
            return self._finish(s, "stop")
        s.output.append(token)
        if p.logprobs is not None:
            s.logprobs.append(logprob)
            s.top_logprobs.append(top)
        if s.counts is not None:
            s.counts[token] += 1
            s.seen[token] = True
        if s.constraint is not None:
            s.constraint.advance(token)
        piece = s.text.push(token)
        s.pieces.append(piece)
        out = Output(s, token, piece, logprob, top)
        if s.text.stopped or (s.constraint is not None and s.constraint.is_finished()):
            reason = "stop"
        elif len(s.output) >= s.budget:  # the budget also ends at the context's last position
            reason = "length"
        else:
            s.next_token = token
            return out
        end = self._finish(s, reason)
        out.text += end.text
        out.finish_reason = reason
        return out

    def _finish(self, s: Sequence, reason: str) -> Output:
        s.finish_reason, s.next_token = reason, None
        tail = s.text.flush() if reason != "cancelled" else ""
        s.pieces.append(tail)
        self.cache.free(s.id)
        return Output(s, None, tail, finish_reason=reason)

    def stats(self) -> dict:
        c = self.cache
        return {"steps": self.steps, "prefills": self.prefills, "forward_calls": self.forward_calls,
                "tokens_generated": self.tokens_generated, "running": len(self.running),
                "waiting": len(self.waiting), "max_batch_size": self.max_batch_size,
                "max_batch_seen": self.max_batch_seen, "batch_rows": self.batch_rows,
                "mean_batch_size": round(self.batch_rows / self.steps, 3) if self.steps else 0.0,
                "kv_budget_tokens": self.kv_tokens, "kv_block_size": c.block_size,
                "kv_tokens_held": c.tokens_held(), "kv_blocks_used": c.blocks_used(),
                "kv_bytes_used": c.blocks_used() * c.block_size * c.bytes_per_token,
                "kv_bytes_allocated": c.bytes_allocated(),
                "kv_tokens_reserved": sum(s.reserve for s in self.running)}


def _top(lp: torch.Tensor, k: int) -> list:
    """The k most likely (token id, logprob) pairs of each row of log-probabilities (n, V)."""
    if not k:
        return [[] for _ in range(lp.shape[0])]
    values, ids = torch.topk(lp, min(k, lp.shape[1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _setting(values: list):
    # one number when every row agrees (sampling then takes its fast paths), else a tensor (n,)
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=torch.float32)


__all__ = ["Engine", "Sequence", "Output", "CacheFull", "PREFILL_CHUNK"]
