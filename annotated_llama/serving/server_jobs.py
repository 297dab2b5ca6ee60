"""Running one request's generations on the shared scheduler and shaping them as OpenAI responses.

A request becomes one job per prompt (a chat request has one), each with its `n` completions,
which the engine forks from one prefill of the prompt (engine.py, `add(prompt, params, n)`);
choice `index` is prompt * n + choice, in order, as OpenAI numbers them. With best_of > n a job
samples best_of completions and the n with the highest mean logprob per token are answered. All
jobs are submitted at once, so they decode side by side in the scheduler's batch. Their events come
back on the scheduler's thread and are handed to the request's event loop through the loop's
`Mailbox` (scheduler.py): one wake-up of the loop per engine step for every row of every request.
Non-streamed, the handler gathers every job's text; streamed, the events of one wake-up become
server-sent events (choices interleaved, each with its index), then `data: [DONE]`: a choice's
tokens that queued up while the loop was busy go out as one chunk (OpenAI's deltas may hold
several tokens; its logprobs still list every token), and all of a wake-up's chunks in one write.
With `stream_options.include_usage` the usage is sent exactly once, in a last chunk whose
`choices` is empty, and every other chunk carries `"usage": null` (OpenAI's behaviour); without
it no chunk carries usage. A client that goes away cancels its jobs: their rows are freed before the
next decode step.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastapi.responses import JSONResponse, StreamingResponse

from ..core.kv_cache import ContextFull
from .openai_logprobs import chat_logprobs, completion_logprobs, mean_logprob
from .openai_schema import APIError
from .scheduler import Event, QueueFull, SamplingParams, mailbox
from .tools import ToolCallStream, parse_tool_calls


@dataclass
class JobSpec:
    """One prompt's `n` completions, submitted as one job (they share one prefill). `index` is the
    first choice's index; `keep` < n: best_of, only the `keep` best are answered."""
    ids: list[int]
    params: SamplingParams
    index: int
    n: int = 1
    echo: str = ""  # completions with echo: the prompt's text, put before the answer
    keep: Optional[int] = None

    @property
    def answers(self) -> int:
        return self.n if self.keep is None else self.keep


@dataclass
class Shape:
    """What the response looks like: chat or text, tools to look for, logprobs, usage, obfuscation."""
    chat: bool
    model: str
    tokenizer: object = None
    tool_names: Optional[set] = None
    parallel_tool_calls: bool = True
    logprobs: bool = False  # report the engine's logprobs (k alternatives: the params' `logprobs`)
    include_usage: bool = False
    obfuscate: bool = False
    rid: str = field(default="")
    created: int = 0


def check_context(engine, ids: list[int], max_tokens: int, chat: bool):
    """The engine's context check with OpenAI's rule (prompt + max_tokens must fit) and its error text,
    before any grammar is compiled or a job submitted."""
    where = "messages" if chat else "prompt"
    try:  # (a max_tokens beyond the context is refused as such, not by SamplingParams' own limit)
        engine.check(ids, SamplingParams(max_tokens=min(max_tokens, engine.max_seq_len + 1)), exact=True)
    except ContextFull as e:
        raise APIError(400, f"This model's maximum context length is {e.n_ctx} tokens. However, you requested "
                            f"{e.prompt_len + max_tokens} tokens ({e.prompt_len} in the {where}, {max_tokens} "
                            f"in the completion). Please reduce the length of the {where} or completion.",
                       param=where, code="context_length_exceeded") from None
    except ValueError as e:  # over the KV budget: it can never be admitted
        raise APIError(400, f"{e}; reduce max_tokens or the {where}", param="max_tokens",
                       code="context_length_exceeded") from None


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Run:
    """The jobs of one request, submitted together. Each completion is a slot k (the specs' n
    completions in order); events arrive in `self.pending` as (slot, Event, monotonic time) (`take`
    waits for them), and `note` keeps each slot's text pieces and (token, logprob, top, offset) tokens."""

    def __init__(self, scheduler, specs: list[JobSpec], chat: bool, metrics=None):
        self.scheduler, self.specs, self.metrics = scheduler, specs, metrics
        self.arrived, self.pending, self.ready = time.monotonic(), [], asyncio.Event()
        box = mailbox(asyncio.get_running_loop())
        self.first = [sum(s.n for s in specs[:i]) for i in range(len(specs))]  # spec i's first slot
        self.slots = [(i, j) for i, s in enumerate(specs) for j in range(s.n)]  # slot -> (spec, choice)
        self.jobs, self.finished = [], {}
        self.times = [[] for _ in self.slots]
        self.texts = [[] for _ in self.slots]
        self.length = [0] * len(self.slots)  # of the slot's text so far
        self.tokens = [[] for _ in self.slots]  # (token id, logprob, top, offset in the slot's text)
        leading = [chat] * len(self.slots)
        put, clock = box.items.append, time.monotonic

        def emitter(i):
            first = self.first[i]

            def emit(ev: Event):  # on the scheduler's thread
                k = first + ev.index
                if leading[k] and ev.text:  # a chat answer starts at its first non-space (Meta strips it)
                    ev.text = ev.text.lstrip()
                    leading[k] = not ev.text
                put((self, (k, ev, clock())))
            return emit
        if len(self.slots) > scheduler.max_queue:  # could never be queued at once, however idle the server
            raise APIError(400, f"this request needs {len(self.slots)} generations (prompts x n), more than the "
                                f"server queues at once ({scheduler.max_queue})",
                           param="n" if len(specs) == 1 else "prompt")
        try:
            for i, spec in enumerate(specs):
                self.jobs.append(scheduler.submit(spec.ids, spec.params, emitter(i), n=spec.n, flush=box.flush))
        except QueueFull as e:
            self.cancel()
            raise APIError(503, f"server busy: {e}; retry later", "unavailable_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as e:  # over the KV budget: this request can never be admitted
            self.cancel()
            raise APIError(400, f"{e}; reduce max_tokens or the prompt", param="max_tokens",
                           code="context_length_exceeded") from None
        except RuntimeError as e:  # the scheduler has stopped
            self.cancel()
            raise APIError(503, str(e), "unavailable_error") from None

    def cancel(self):
        for i, job in enumerate(self.jobs):
            if any(self.first[i] + j not in self.finished for j in range(self.specs[i].n)):
                self.scheduler.cancel(job)

    async def take(self, timeout: Optional[float] = None) -> list:
        """The events that have arrived, once there is at least one (or, after `timeout` seconds
        without any, none)."""
        while not self.pending:
            self.ready.clear()
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        items, self.pending = self.pending, []
        return items

    def note(self, k: int, ev: Event, at: float):
        if ev.token is not None:
            self.tokens[k].append((ev.token, ev.logprob, ev.top_logprobs, self.length[k]))
        if ev.text:
            self.times[k].append(at)
            self.texts[k].append(ev.text)
            self.length[k] += len(ev.text)
        if ev.finish_reason is not None:
            self.finished[k] = ev
            if self.metrics is not None and ev.finish_reason in ("stop", "length"):
                prompt = ev.prompt_tokens if self.slots[k][1] == 0 else 0  # a prompt counts once, whatever n is
                self.metrics.observe_job(self.arrived, self.times[k], prompt, ev.completion_tokens)

    def done(self) -> bool:
        return len(self.finished) == len(self.slots)

    def usage(self) -> dict:
        prompts = sum(len(s.ids) for s in self.specs)  # a prompt counts once, whatever n (or best_of) is
        return usage(prompts, sum(ev.completion_tokens for ev in self.finished.values()))

    def logprobs(self, k: int, shape: Shape, tokens=None, prompt: Optional[bool] = None) -> Optional[dict]:
        """Slot k's logprobs in the response's shape (None unless asked). Whole: every token, the
        echoed prompt's first; a chunk's: only `tokens`, the prompt's only if `prompt`."""
        if not shape.logprobs:
            return None
        whole = tokens is None
        tokens = self.tokens[k] if whole else tokens
        triples = [t[:3] for t in tokens]
        if shape.chat:
            return chat_logprobs(shape.tokenizer, triples)
        spec, ev = self.specs[self.slots[k][0]], self.finished.get(k)
        if (whole if prompt is None else prompt) and spec.echo and spec.params.prompt_logprobs and ev is not None:
            prompt = (spec.ids, ev.prompt_logprobs, ev.prompt_top_logprobs)
        else:
            prompt = None
        return completion_logprobs(shape.tokenizer, triples, [len(spec.echo) + t[3] for t in tokens], prompt)

    def answered(self) -> list[tuple[int, int]]:
        """(slot, choice index) of every answer: all of them, or for best_of each prompt's `keep`
        slots with the highest mean logprob per token, best first."""
        out = []
        for i, spec in enumerate(self.specs):
            slots = [self.first[i] + j for j in range(spec.n)]
            if spec.keep is not None and spec.keep < spec.n:
                slots = sorted(slots, key=lambda k: -mean_logprob([t[:3] for t in self.tokens[k]]))[:spec.keep]
            out += [(k, spec.index + r) for r, k in enumerate(slots)]
        return out


def _failure(ev: Event) -> APIError:
    return APIError(500, f"generation failed: {ev.error or ev.finish_reason}", "server_error")


async def collect(request, run: Run, shape: Shape):
    """The whole response (non-streamed)."""
    checked = time.monotonic()
    try:
        while not run.done():
            for k, ev, at in await run.take(timeout=0.5):
                run.note(k, ev, at)
            if time.monotonic() - checked > 0.5:  # is the client still there?
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
    finally:
        run.cancel()  # (no-op for finished jobs) the client went away or the server is stopping
    request.state.usage = (run.usage()["prompt_tokens"], run.usage()["completion_tokens"])
    choices = []
    for k, index in run.answered():
        ev = run.finished[k]
        if ev.finish_reason not in ("stop", "length"):
            raise _failure(ev)
        text, finish, logprobs = "".join(run.texts[k]), ev.finish_reason, run.logprobs(k, shape)
        if not shape.chat:
            echo = run.specs[run.slots[k][0]].echo
            choices.append({"index": index, "text": echo + text, "logprobs": logprobs, "finish_reason": finish})
            continue
        message = {"role": "assistant", "content": text}
        calls = parse_tool_calls(text, shape.tool_names) if shape.tool_names else None
        if calls:
            message = {"role": "assistant", "content": None,
                       "tool_calls": calls if shape.parallel_tool_calls else calls[:1]}
            finish = "tool_calls"
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
    choices.sort(key=lambda c: c["index"])
    return {"id": shape.rid, "object": "chat.completion" if shape.chat else "text_completion",
            "created": shape.created, "model": shape.model, "choices": choices, "usage": run.usage()}


def stream(request, run: Run, shape: Shape) -> StreamingResponse:
    """Server-sent events. A chunk's logprobs cover the tokens whose text it carries (a token whose
    text is held back, e.g. half a character, is reported with the next chunk that has text). With
    echo and logprobs, a choice's chunks wait for its prompt's logprobs, which come with its end."""
    obj = "chat.completion.chunk" if shape.chat else "text_completion"
    indices = {k: run.specs[i].index + j for k, (i, j) in enumerate(run.slots)}
    held = [0] * len(run.slots)  # tokens of slot k already reported in a chunk
    late = {k for k, (i, _) in enumerate(run.slots) if shape.logprobs and run.specs[i].echo
            and run.specs[i].params.prompt_logprobs}  # echo + logprobs: held to the end
    # json.dumps of {id, object, created, model, choices, **extra[, usage: null][, obfuscation]},
    # built around the one part that changes: the same bytes without a dict and its encoding per token
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    head = (f'data: {{"id": {dumps(shape.rid)}, "object": {dumps(obj)}, "created": {dumps(shape.created)}, '
            f'"model": {dumps(shape.model)}, "choices": ')

    def event(choices, **extra) -> str:
        tail = "".join(f", {dumps(k)}: {dumps(v)}" for k, v in extra.items())
        if shape.include_usage and "usage" not in extra:
            tail += ', "usage": null'
        if shape.obfuscate:  # random padding, so chunk sizes do not reveal the tokens' lengths
            tail += ', "obfuscation": ' + dumps(secrets.token_urlsafe(secrets.randbelow(24) + 1))
        return head + dumps(choices) + tail + "}\n\n"

    def piece(k, text="", finish=None, delta=None, report=True):
        logprobs = None
        if shape.logprobs and report and held[k] < len(run.tokens[k]):  # the tokens not yet reported
            logprobs = run.logprobs(k, shape, run.tokens[k][held[k]:])
            held[k] = len(run.tokens[k])
        if shape.chat:
            delta = delta if delta is not None else ({"content": text} if text else {})
            return event([{"index": indices[k], "delta": delta, "logprobs": logprobs, "finish_reason": finish}])
        return event([{"index": indices[k], "text": text, "logprobs": logprobs, "finish_reason": finish}])

    def echoed(k):  # completions with echo: the prompt's text first (and its logprobs, when asked)
        spec = run.specs[run.slots[k][0]]
        if not shape.logprobs:
            return piece(k, spec.echo)
        lp = run.logprobs(k, shape, [], prompt=True)
        return event([{"index": indices[k], "text": spec.echo, "logprobs": lp, "finish_reason": None}])

    async def events():
        holders = [ToolCallStream(shape.tool_names) if shape.tool_names else None for _ in run.slots]
        waiting = {k: [] for k in late}  # their chunks, until the prompt's logprobs arrive

        def send(k, chunks, out):
            if k in waiting:
                waiting[k] += chunks
            else:
                out += chunks
        try:
            first = []
            for k, (i, _) in enumerate(run.slots):
                if shape.chat:  # OpenAI's first chunk of a choice announces the role
                    first.append(piece(k, delta={"role": "assistant", "content": ""}, report=False))
                elif run.specs[i].echo and k not in late:
                    first.append(echoed(k))
            if first:
                yield "".join(first)
            while not run.done():
                out, texts = [], {}  # texts: slot -> text of this wake-up's tokens, sent as one chunk
                for k, ev, at in await run.take():
                    run.note(k, ev, at)
                    text = holders[k].push(ev.text) if holders[k] else ev.text
                    if ev.finish_reason is None:
                        if text:  # (a chat answer's leading spaces become empty pieces)
                            texts[k] = texts.get(k, "") + text
                        continue
                    if ev.finish_reason not in ("stop", "length"):  # what came before it, then the error
                        for j, t in texts.items():
                            send(j, [piece(j, t)], out)
                        yield "".join(out) + "data: " + json.dumps(_failure(ev).body()) + "\n\n"
                        return
                    text = texts.pop(k, "") + text
                    finish, calls, chunks = ev.finish_reason, None, []
                    if holders[k]:
                        rest, calls = holders[k].finish()
                        text += rest
                    if text:
                        chunks.append(piece(k, text))
                    if calls:
                        calls = calls if shape.parallel_tool_calls else calls[:1]
                        chunks.append(piece(k, delta={"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
                        finish = "tool_calls"
                    chunks.append(piece(k, "", finish))
                    if k in waiting:
                        chunks = [echoed(k)] + waiting.pop(k) + chunks
                    out += chunks
                for k, text in texts.items():
                    send(k, [piece(k, text)], out)
                if out:
                    yield "".join(out)
            u = run.usage()
            request.state.usage = (u["prompt_tokens"], u["completion_tokens"])
            yield (event([], usage=u) if shape.include_usage else "") + "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def new_shape(chat: bool, model: str, **kw) -> Shape:
    return Shape(chat=chat, model=model, rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                 created=int(time.time()), **kw)
