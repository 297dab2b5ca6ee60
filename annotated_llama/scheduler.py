"""One scheduler shared by every request: continuous batching on a background thread.

A server that runs each HTTP request's generation loop on its own would either serialise the
requests (one model, one request at a time) or run B separate batch-1 decodes, each re-reading
all the weights per token. Decoding is memory-bound (../docs MACHINE.md: batch-1 decode reads
every weight once per token), so B rows decoded in one forward cost little more than one row.
Orca (Yu et al. 2022, "Orca: A Distributed Serving System for Transformer-Based Generative
Models", OSDI) adds the other half, *iteration-level scheduling*: a new request does not wait
for the running batch to finish; it is prefilled and joins at the next decode step, and a
finished one leaves at once, so its row is reused. vLLM and llama.cpp's server work this way.

Here one thread owns the model. The KV cache has `max_batch_size` rows (allocated once, by a
first forward at that batch size); active requests always occupy rows 0..n-1, so a decode step
is one `model(tokens[n, 1], start_pos=lengths[n])` call with each row at its own cache slot.
- Prefill of a new request into row r: a batch-1 forward writes cache row 0 (the per-row path
  maps batch row b to cache row b), so rows 0 and r swap their first P slots, the prompt is
  prefilled in row 0, and the rows swap back. Cost O(P) copies, no other row disturbed.
- A request that leaves row i: the last active row's cache is swapped into row i (O(its length)).
- Every cache edit is a forward call or `tensor_parallel.swap_cache_rows`, which `serve --tp N`
  mirrors on the other ranks (each holds its heads' slice of the cache).
- Admission: a free row, and the tokens it may reach (prompt + max_tokens) within the KV budget.
  Waiting requests queue (bounded); beyond the queue `submit` raises `QueueFull` (HTTP 503).
- Cancellation (client gone): `job.cancel()`; the row is freed before the next step.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .sampling import make_generator, sample
from .streaming import TextStream
from .tensor_parallel import swap_cache_rows


PREFILL_CHUNK = 512  # prompt tokens per prefill forward


log = logging.getLogger("annotated_llama.scheduler")


class QueueFull(RuntimeError):
    """The wait queue is full; retry later (HTTP 503 + Retry-After)."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: Optional[int] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class Event:
    """What a job reports, in order: text pieces, then one final event (`finish_reason` set)."""
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None


class Job:
    """One request inside the scheduler. `emit` is called on the scheduler thread."""

    def __init__(self, prompt_tokens: list[int], params: SamplingParams, emit: Callable[[Event], None],
                 tokenizer, device="cpu"):
        self.prompt_tokens, self.params, self.emit = list(prompt_tokens), params, emit
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = make_generator(seed, device)  # per request: its draws ignore who shares the batch
        self.presence: Optional[torch.Tensor] = None  # (V,) bool, for the repetition penalty
        self.text = TextStream(tokenizer, context_ids=prompt_tokens, stops=params.stop)
        self.generated: list[int] = []
        self.length = 0  # cache slots filled
        self.cancelled = False
        self.done = False

    def cancel(self):
        self.cancelled = True

    @property
    def reserve(self) -> int:  # the most cache slots it can reach
        return len(self.prompt_tokens) + self.params.max_tokens


class Scheduler:
    """`Scheduler(model, tokenizer, max_batch_size=8)`; `submit(...)` from any thread; `start()` runs it.

    kv_budget: the most cache slots (prompt + max_tokens, summed over active requests) admitted at
    once; default max_batch_size * max_seq_len. max_queue: requests allowed to wait for a row.
    step_delay: seconds to sleep after each decode step (0; tests use it to make streams slow).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, kv_budget: Optional[int] = None,
                 max_queue: int = 64, step_delay: float = 0.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len = model.params.max_seq_len
        self.max_batch_size = max_batch_size
        self.kv_budget = kv_budget or max_batch_size * self.max_seq_len
        self.max_queue, self.step_delay = max_queue, step_delay
        self.waiting: collections.deque[Job] = collections.deque()
        self.active: list[Job] = []  # active[i] lives in cache row i
        self.cond = threading.Condition()
        self.thread: Optional[threading.Thread] = None
        self.stopping = False
        self.error: Optional[str] = None
        # counters (read by /health and /metrics; written by the scheduler thread only)
        self.steps = self.prefills = self.tokens_generated = self.batch_rows = 0
        self.max_batch_seen = self.completed = self.cancelled = self.rejected = self.failures = 0
        self.last_failure: Optional[str] = None

    # ---- the public side (any thread) -------------------------------------------------

    def start(self) -> "Scheduler":
        with self.cond:  # two threads starting it at once must not get two model owners
            if self.thread is None or not self.thread.is_alive():
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="annotated-llama-scheduler", daemon=True)
                self.thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, prompt_tokens: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Job:
        if not prompt_tokens:
            raise ValueError("the prompt is empty")
        job = Job(prompt_tokens, params, emit, self.tokenizer, self._device)
        if job.reserve > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt_tokens)}) + max_tokens ({params.max_tokens}) exceeds "
                             f"the context of {self.max_seq_len} tokens")
        if job.reserve > self.kv_budget:
            raise ValueError(f"prompt + max_tokens ({job.reserve}) exceeds the KV budget of {self.kv_budget} tokens")
        with self.cond:
            if self.error is not None:
                raise RuntimeError(f"the scheduler stopped: {self.error}")
            if len(self.waiting) >= self.max_queue:
                self.rejected += 1
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(job)
            self.cond.notify_all()
        return job

    def cancel(self, job: Job):
        """Stop `job` (its client went away): dropped from the queue now, or from its row before
        the next decode step."""
        job.cancel()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
                job.done = True
                self.cancelled += 1
            self.cond.notify_all()

    def generate(self, prompt_tokens: list[int], params: SamplingParams, timeout: float = 600) -> Event:
        """Blocking helper (docs, benchmarks): the whole text and the final event's counts."""
        done, pieces, final = threading.Event(), [], []

        def emit(ev: Event):
            pieces.append(ev.text)
            if ev.finish_reason is not None:
                final.append(ev)
                done.set()
        self.start().submit(prompt_tokens, params, emit)
        if not done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return Event("".join(pieces), final[0].finish_reason, final[0].prompt_tokens,
                     final[0].completion_tokens, final[0].error)

    def stats(self) -> dict:
        return {"steps": self.steps, "prefills": self.prefills, "tokens_generated": self.tokens_generated,
                "active": len(self.active), "waiting": len(self.waiting),
                "max_batch_size": self.max_batch_size, "max_batch_seen": self.max_batch_seen,
                "batch_rows": self.batch_rows,  # sum over steps of the rows decoded in that step
                "mean_batch_size": round(self.batch_rows / self.steps, 3) if self.steps else 0.0,
                "completed": self.completed, "cancelled": self.cancelled, "rejected": self.rejected,
                "failures": self.failures, "last_failure": self.last_failure,
                "kv_budget": self.kv_budget, "kv_reserved": sum(j.reserve for j in self.active),
                "running": self.thread is not None and self.thread.is_alive(), "error": self.error}

    # ---- the scheduler thread ------------------------------------------------------------

    def _run(self):
        try:
            with torch.inference_mode():
                # Allocate the cache once, for every row; from now on start_pos is always a tensor.
                self.model(torch.zeros(self.max_batch_size, 1, dtype=torch.long, device=self._device), 0)
                while True:
                    with self.cond:
                        while not self.stopping and not self.active and not self.waiting:
                            self.cond.wait()
                        if self.stopping:
                            break
                    self._admit()
                    self._drop_finished()
                    if self.active:
                        try:
                            self._decode_step()
                        except Exception as e:  # fail this batch's requests, keep serving the next ones
                            self._fail(self.active, e)
                        self._drop_finished()
                        if self.step_delay:
                            time.sleep(self.step_delay)
        except Exception as e:  # the thread itself failed: tell every waiting client rather than hang them
            self.error = f"{type(e).__name__}: {e}"
            for job in list(self.active) + list(self.waiting):
                self._finish(job, "error", error=self.error)
            raise
        finally:
            for job in list(self.active) + list(self.waiting):
                if not job.done:
                    self._finish(job, "cancelled")
            self.active.clear()
            self.waiting.clear()
            self.model.clear_cache()

    @property
    def _device(self):
        return self.model.tok_embeddings.weight.device

    def _admit(self):
        while len(self.active) < self.max_batch_size:
            with self.cond:
                if not self.waiting:
                    return
                job = self.waiting[0]
                if not job.cancelled and sum(j.reserve for j in self.active) + job.reserve > self.kv_budget:
                    return  # first come, first served: the head waits for room
                self.waiting.popleft()
            if job.cancelled:
                self._finish(job, "cancelled")
                continue
            try:
                self._prefill(job, row=len(self.active))
            except Exception as e:  # this request's failure only: the others keep their rows
                self._fail([job], e)
                continue
            self.active.append(job)

    def _prefill(self, job: Job, row: int):
        P = len(job.prompt_tokens)
        tokens = torch.tensor([job.prompt_tokens], device=self._device)  # (1, P)
        # Row 0 belongs to a running request: swap its first P slots into row `row` (free), prefill
        # in row 0, swap back. The swap goes through swap_cache_rows, not in-place copies here, so
        # that under tensor parallelism every rank's cache slice makes the same move.
        if row:
            swap_cache_rows(self.model, 0, row, P)
        try:
            for i in range(0, P, PREFILL_CHUNK):  # chunks: logits (1, chunk, V), not (1, P, V), in memory
                chunk = tokens[:, i:i + PREFILL_CHUNK]  # (1, <=chunk)
                logits = self.model(chunk, torch.full((1,), i, dtype=torch.long, device=self._device))
        finally:  # give row 0 back even if the prefill failed (row `row` then holds junk: it is free)
            if row:
                swap_cache_rows(self.model, 0, row, P)
        job.length = P
        if job.params.repetition_penalty != 1.0:
            job.presence = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)  # (V,)
            job.presence[tokens[0]] = True
        self.prefills += 1
        self._sample([job], logits[:, -1])

    def _decode_step(self):
        n = len(self.active)
        last = torch.tensor([[j.generated[-1]] for j in self.active], device=self._device)  # (n, 1)
        start = torch.tensor([j.length for j in self.active], device=self._device)  # (n,)
        logits = self.model(last, start)[:, -1]  # (n, V)
        self.steps += 1
        self.batch_rows += n
        self.max_batch_seen = max(self.max_batch_seen, n)
        for job in self.active:
            job.length += 1
        self._sample(self.active, logits)

    def _sample(self, jobs: list[Job], logits: torch.Tensor):
        """One token for each job from its row of logits (n, V), with each job's own settings."""
        logits = logits[:, :self.tokenizer.n_words]  # a padded embedding: never ids the tokenizer lacks
        ps = [j.params for j in jobs]
        presence = None
        if any(j.presence is not None for j in jobs):
            presence = torch.stack([j.presence if j.presence is not None else
                                    torch.zeros_like(logits[0], dtype=torch.bool) for j in jobs])  # (n, V)
        tokens = sample(logits, temperature=_setting([p.temperature for p in ps]),
                        top_p=_setting([p.top_p for p in ps]), top_k=_setting([p.top_k or 0 for p in ps]),
                        repetition_penalty=_setting([p.repetition_penalty for p in ps]),
                        presence=presence, generator=[j.generator for j in jobs]).tolist()  # n ints
        for job, token in zip(jobs, tokens):
            self._take(job, token)

    def _take(self, job: Job, token: int):
        """Report the sampled token's text and decide whether the job ends."""
        self.tokens_generated += 1
        if job.cancelled:
            return
        p = job.params
        if token in self.tokenizer.stop_ids and not p.ignore_eos:
            self._finish(job, "stop")
            return
        job.generated.append(token)
        if job.presence is not None:
            job.presence[token] = True
        piece = job.text.push(token)
        if piece:
            job.emit(Event(piece))
        if job.text.stopped:
            self._finish(job, "stop")
        elif len(job.generated) >= p.max_tokens or job.length >= self.max_seq_len:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: str, error: Optional[str] = None):
        if job.done:
            return
        job.done = True
        tail = job.text.flush() if reason in ("stop", "length") else ""
        if reason == "cancelled":
            self.cancelled += 1
        elif reason != "error":
            self.completed += 1
        job.emit(Event(tail, reason, len(job.prompt_tokens), len(job.generated), error))

    def _fail(self, jobs: list[Job], e: Exception):
        self.failures += 1
        self.last_failure = f"{type(e).__name__}: {e}"
        log.exception("generation failed for %d request(s)", len(jobs))
        for job in jobs:
            self._finish(job, "error", error=self.last_failure)

    def _drop_finished(self):
        i = 0
        while i < len(self.active):
            job = self.active[i]
            if job.cancelled and not job.done:
                self._finish(job, "cancelled")
            if not job.done:
                i += 1
                continue
            last = self.active.pop()
            if last is not job:  # keep rows dense: move the last row's cache into row i (mirrored under --tp)
                swap_cache_rows(self.model, i, len(self.active), last.length)
                self.active[i] = last


def _setting(values: list):
    # one number when every row agrees (sampling then takes its fast paths: all-greedy is a
    # plain argmax with no draw), else a tensor (n,) of per-row values
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, dtype=torch.float32)
