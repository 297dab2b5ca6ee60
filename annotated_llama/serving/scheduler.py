"""The server's scheduler: the engine, a thread that owns it, admission and cancellation.

Continuous batching itself is the engine's (engine.py: every step prefills the newcomers and
decodes one token for every running request, each at its own place in the paged KV cache). What
a server adds is concurrency: HTTP handlers on other threads submit requests and wait for their
events, while one thread owns the model and the cache and runs `engine.step()` as long as there
is work. So the handlers never touch the model, and under tensor parallelism every forward call
(and so every collective) comes from that one thread, in one order.

- Admission: a request whose prompt + max_tokens can never fit the context or the KV budget is
  refused in `submit` (ValueError: HTTP 400); one that fits later waits in the engine's queue;
  beyond `max_queue` waiting requests, `submit` raises `QueueFull` (HTTP 503 + Retry-After).
- Cancellation (client gone): `cancel(job)`; its blocks go back before the next step.
- A failing step fails the requests in it (their clients get an error event) and the scheduler
  goes on serving the next ones.
- Hand-off: `emit` is called for every event, on this thread; a job's optional `flush` once after
  each step's events (and after any other events), so a consumer on another thread (the server's
  event loop) can be woken once per step for all its rows rather than once per token.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..core.sampling import SamplingParams
from ..inference.backends import make_runner, runner_state
from ..inference.engine import Engine, Output

log = logging.getLogger("annotated_llama.scheduler")


class QueueFull(RuntimeError):
    """The wait queue is full; retry later (HTTP 503 + Retry-After)."""


@dataclass(slots=True)  # one per token: slots make it cheaper to build
class Event:
    """What a job reports, in order: pieces of text (one per token, `index` naming which of the
    job's n completions), then one final event per completion (`finish_reason` set)."""
    text: str = ""
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    index: int = 0
    token: Optional[int] = None
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token id, logprob)]
    prompt_logprobs: Optional[list] = None  # on the final event, with params.prompt_logprobs
    prompt_top_logprobs: Optional[list] = None
    tokens: list = field(default_factory=list)  # on the final event: every output token id


class Job:
    """One request: `n` completions of one prompt. `emit` (each event) and `flush` (after a step's
    events) are called on the scheduler's thread."""

    def __init__(self, prompt_tokens: list[int], params: SamplingParams, emit: Callable[[Event], None], n: int = 1,
                 flush: Optional[Callable[[], None]] = None):
        self.prompt_tokens, self.params, self.emit, self.n = list(prompt_tokens), params, emit, n
        self.flush = flush
        self.seqs: list = []  # the engine's sequences, once admitted
        self.cancelled = False
        self.done = False
        self.submitted = time.perf_counter()

    def cancel(self):
        self.cancelled = True


class Scheduler:
    """`Scheduler(model, tokenizer, max_batch_size=8)`; `submit(...)` from any thread; `start()`
    runs it. kv_budget: cache positions (prompt + max_tokens, summed over running requests) at
    most (default max_batch_size x the context; memory is taken only as tokens arrive).
    step_delay: seconds to sleep after each step (tests use it to make streams slow)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, kv_budget: Optional[int] = None,
                 max_queue: int = 64, step_delay: float = 0.0, backend: str = "auto", runner=None):
        if runner is None:
            runner = make_runner(model, backend, max_batch_size=max_batch_size)
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, kv_tokens=kv_budget, runner=runner)
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_len, self.max_batch_size = self.engine.max_seq_len, max_batch_size
        self.kv_budget = self.engine.kv_tokens
        self.max_queue, self.step_delay = max_queue, step_delay
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.jobs: dict[int, tuple[Job, int]] = {}  # engine sequence id -> (its job, its index)
        self.live: set[Job] = set()  # submitted, not yet finished
        self.wake = threading.Event()
        self.thread: Optional[threading.Thread] = None
        self.lock = threading.Lock()
        self.stopping = False
        self.error: Optional[str] = None
        self.completed = self.cancelled = self.rejected = self.failures = 0
        self.last_failure: Optional[str] = None
        self.flushes: dict = {}  # the `flush` of every job that has had events since the last step (ordered)

    # ---- the public side (any thread) -------------------------------------------------------

    def start(self) -> "Scheduler":
        with self.lock:  # two threads starting it at once must not get two model owners
            if self.thread is None or not self.thread.is_alive():
                self.stopping = False
                self.thread = threading.Thread(target=self._run, name="annotated-llama-scheduler", daemon=True)
                self.thread.start()
        return self

    def stop(self, timeout: float = 10.0):
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(timeout)

    def submit(self, prompt_tokens: list[int], params: SamplingParams, emit: Callable[[Event], None],
               n: int = 1, flush: Optional[Callable[[], None]] = None) -> Job:
        if self.error is not None:
            raise RuntimeError(f"the scheduler stopped: {self.error}")
        self.engine.check(list(prompt_tokens), params)  # ValueError: can never run
        job = Job(prompt_tokens, params, emit, n, flush)
        with self.lock:  # counted in sequences: a job of n completions takes n rows
            held = sum(j.n for j in self.live)
            if held + n > self.max_queue + self.max_batch_size:
                self.rejected += 1
                raise QueueFull(f"{max(held - self.max_batch_size, 0)} sequences are already waiting")
            self.live.add(job)
        self.inbox.put(job)
        self.wake.set()
        return job

    def cancel(self, job: Job):
        """Stop `job` (its client went away): its rows are freed before the next step."""
        job.cancel()
        self.wake.set()

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
                     final[0].completion_tokens, final[0].error, tokens=final[0].tokens)

    def stats(self) -> dict:
        return {**self.engine.stats(), **runner_state(self.engine.runner), "active": len(self.engine.running),
                "kv_budget": self.kv_budget,
                "completed": self.completed, "cancelled": self.cancelled, "rejected": self.rejected,
                "failures": self.failures, "last_failure": self.last_failure,
                "thread_alive": self.thread is not None and self.thread.is_alive(), "error": self.error}

    # ---- the scheduler thread ---------------------------------------------------------------

    def _run(self):
        try:
            with torch.inference_mode():
                while not self.stopping:
                    self._take_inbox()
                    self._cancel_requested()
                    if not self.engine.has_work:
                        self._flush()
                        self.wake.wait(0.5)
                        self.wake.clear()
                        continue
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # fail this step's requests, keep serving the next ones
                        self._fail(e)
                        self._flush()
                        continue
                    for out in outputs:
                        self._emit(out)
                    self._flush()
                    if self.step_delay:
                        time.sleep(self.step_delay)
        except Exception as e:  # the thread itself failed: tell every client rather than hang them
            self.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self._take_inbox()
            for job in list(self.live):
                for i in range(len(job.seqs) or job.n):
                    self._end(job, i, "error" if self.error else "cancelled", self.error)
            self._flush()

    def _take_inbox(self):
        while True:
            try:
                job = self.inbox.get_nowait()
            except queue.Empty:
                return
            if job.cancelled:
                for i in range(job.n):
                    self._end(job, i, "cancelled")
                continue
            try:  # a sequence's grammar state is built here (the params' constraint factory)
                job.seqs = self.engine.add(job.prompt_tokens, job.params, job.n)
            except Exception as e:  # fail this request alone, not the scheduler
                log.exception("adding a request failed")
                for i in range(job.n):
                    self._end(job, i, "error", f"{type(e).__name__}: {e}")
                continue
            for i, seq in enumerate(job.seqs):
                self.jobs[seq.id] = (job, i)

    def _cancel_requested(self):
        for job in [j for j in self.live if j.cancelled and j.seqs]:
            for i, seq in enumerate(job.seqs):
                if not seq.done:
                    self.engine.cancel(seq)
                    self._end(job, i, "cancelled")

    def _emit(self, out: Output):
        job, index = self.jobs.get(out.seq.id, (None, 0))
        if job is None:
            return
        if out.token is not None or out.text:
            job.emit(Event(out.text, index=index, token=out.token, logprob=out.logprob, top_logprobs=out.top_logprobs))
            if job.flush is not None:
                self.flushes[job.flush] = None
        if out.finish_reason is not None:
            self._end(job, index, out.finish_reason)

    def _end(self, job: Job, index: int, reason: str, error: Optional[str] = None):
        seq = job.seqs[index] if index < len(job.seqs) else None
        if seq is not None:
            if self.jobs.pop(seq.id, None) is None:
                return  # already ended
        if reason == "cancelled":
            self.cancelled += 1
        elif reason != "error":
            self.completed += 1
        job.emit(Event("", reason, len(job.prompt_tokens), len(seq.output) if seq else 0, error, index=index,
                       prompt_logprobs=seq.prompt_logprobs if seq else None,
                       prompt_top_logprobs=seq.prompt_top_logprobs if seq else None,
                       tokens=list(seq.output) if seq else []))
        if job.flush is not None:
            self.flushes[job.flush] = None
        if seq is None or all(s.id not in self.jobs for s in job.seqs):
            job.done = True
            with self.lock:
                self.live.discard(job)

    def _flush(self):
        flushes, self.flushes = self.flushes, {}
        for flush in flushes:
            try:
                flush()
            except Exception:  # a consumer's failure must not stop the scheduler
                log.exception("handing events over failed")

    def _fail(self, e: Exception):
        self.failures += 1
        self.last_failure = f"{type(e).__name__}: {e}"
        log.exception("an engine step failed; failing its %d request(s)", len(self.engine.running))
        for seq in list(self.engine.running):
            self.engine.cancel(seq)
            job, index = self.jobs.get(seq.id, (None, 0))
            if job is not None:
                self._end(job, index, "error", self.last_failure)


class Mailbox:
    """Events from the scheduler's thread to one event loop. Each event is only queued (`items`);
    the scheduler calls `flush` after each step, which has the loop woken unless a wake-up is
    already pending (the loop is behind: the events wait for it). `armed` is cleared on the loop
    before it empties the queue, so an event queued after that is covered by the next flush.

    The wake-up itself (`call_soon_threadsafe`: a write to the loop's self-pipe) is made by the
    `_waker` thread, not by the scheduler: the write lets the loop thread take the GIL, and the
    scheduler, coming back from it, would wait for the GIL until the loop has sent the step's
    chunks. Handed to the waker (a SimpleQueue put, which keeps the GIL), the write happens when
    the scheduler next lets go of the GIL, in the next step's compiled forward call (or when it
    goes idle), so the loop's work overlaps the model's instead of following it."""

    def __init__(self, loop):
        self.loop, self.items, self.armed = loop, collections.deque(), False

    def flush(self):  # on the scheduler's thread
        if self.items and not self.armed:
            self.armed = True
            _waker().put(self)

    def _deliver(self):  # on the loop
        self.armed = False
        items = self.items
        while items:
            run, item = items.popleft()
            run.pending.append(item)
            run.ready.set()


_mailboxes: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_bells: list = []  # [the waker's queue], once it is started
_bells_lock = threading.Lock()


def _waker() -> queue.SimpleQueue:
    if not _bells:
        with _bells_lock:
            if not _bells:
                bells: queue.SimpleQueue = queue.SimpleQueue()

                def ring():
                    while True:
                        box = bells.get()
                        with contextlib.suppress(RuntimeError):  # that loop is closed: the server stopped
                            box.loop.call_soon_threadsafe(box._deliver)
                        del box  # (no reference kept to a closed loop while waiting)
                threading.Thread(target=ring, name="annotated-llama-waker", daemon=True).start()
                _bells.append(bells)
    return _bells[0]


def mailbox(loop) -> Mailbox:
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


__all__ = ["Scheduler", "SamplingParams", "Event", "Job", "QueueFull", "Mailbox", "mailbox"]
