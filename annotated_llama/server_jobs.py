"""Running one request's generations on the shared scheduler and shaping them as OpenAI responses.

A request becomes one or more jobs: a completions request has one per prompt and choice (`n`),
a chat request `n`; choice `index` is prompt * n + choice, in order, as OpenAI numbers them. All
are submitted at once, so they decode side by side in the scheduler's batch. Their events come
back on the scheduler's thread and are handed to the request's event loop through one queue.
Non-streamed, the handler gathers every job's text; streamed, each event becomes a server-sent
event as it arrives (choices interleaved, each with its index), then `data: [DONE]`. With
`stream_options.include_usage` the usage is sent exactly once, in a last chunk whose `choices`
is empty, and every other chunk carries `"usage": null` (OpenAI's behaviour); without it no
chunk carries usage. A client that goes away cancels its jobs: their rows are freed before the
next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from fastapi.responses import JSONResponse, StreamingResponse

from .openai_schema import APIError
from .scheduler import Event, QueueFull, SamplingParams
from .tools import ToolCallStream, parse_tool_calls


@dataclass
class JobSpec:
    ids: list[int]
    params: SamplingParams
    index: int
    echo: str = ""  # completions with echo: the prompt's text, put before the answer


@dataclass
class Shape:
    """What the response looks like: chat or text, tools to look for, usage and obfuscation."""
    chat: bool
    model: str
    tool_names: Optional[set] = None
    parallel_tool_calls: bool = True
    include_usage: bool = False
    obfuscate: bool = False
    rid: str = field(default="")
    created: int = 0


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Run:
    """The jobs of one request, submitted together; events arrive in `self.events` as
    (spec index, Event, monotonic time)."""

    def __init__(self, scheduler, specs: list[JobSpec], chat: bool, metrics=None):
        self.scheduler, self.specs, self.metrics = scheduler, specs, metrics
        self.arrived, self.loop, self.events = time.monotonic(), asyncio.get_running_loop(), asyncio.Queue()
        self.jobs, self.finished = [], {}
        self.times = [[] for _ in specs]
        leading = [chat] * len(specs)

        def emitter(k):
            def emit(ev: Event):  # on the scheduler's thread
                if leading[k] and ev.text:  # a chat answer starts at its first non-space (Meta strips it)
                    ev.text = ev.text.lstrip()
                    leading[k] = not ev.text
                with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
                    self.loop.call_soon_threadsafe(self.events.put_nowait, (k, ev, time.monotonic()))
            return emit
        if len(specs) > scheduler.max_queue:  # could never be queued at once, however idle the server
            raise APIError(400, f"this request needs {len(specs)} generations (prompts x n), more than the server "
                                f"queues at once ({scheduler.max_queue})", param="n" if len(specs) > 1 and
                           len({id(s.ids) for s in specs}) == 1 else "prompt")
        try:
            for k, spec in enumerate(specs):
                self.jobs.append(scheduler.submit(spec.ids, spec.params, emitter(k)))
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
        for k, job in enumerate(self.jobs):
            if k not in self.finished:
                self.scheduler.cancel(job)

    def note(self, k: int, ev: Event, at: float):
        if ev.text:
            self.times[k].append(at)
        if ev.finish_reason is not None:
            self.finished[k] = ev
            if self.metrics is not None and ev.finish_reason in ("stop", "length"):
                self.metrics.observe_job(self.arrived, self.times[k], ev.prompt_tokens, ev.completion_tokens)

    def usage(self) -> dict:
        prompts = {id(s.ids): len(s.ids) for s in self.specs}  # a prompt counts once, whatever n is
        return usage(sum(prompts.values()), sum(ev.completion_tokens for ev in self.finished.values()))


def _failure(ev: Event) -> APIError:
    return APIError(500, f"generation failed: {ev.error or ev.finish_reason}", "server_error")


async def collect(request, run: Run, shape: Shape):
    """The whole response (non-streamed)."""
    texts, getter, checked = [[] for _ in run.specs], None, time.monotonic()
    try:
        while len(run.finished) < len(run.specs):
            getter = getter or asyncio.ensure_future(run.events.get())  # kept across waits: no event lost
            done, _ = await asyncio.wait({getter}, timeout=0.5)
            if done:
                k, ev, at = getter.result()
                getter = None
                texts[k].append(ev.text)
                run.note(k, ev, at)
            if time.monotonic() - checked > 0.5:  # is the client still there?
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
    finally:
        if getter is not None:
            getter.cancel()
        run.cancel()  # (no-op for finished jobs) the client went away or the server is stopping
    request.state.usage = (run.usage()["prompt_tokens"], run.usage()["completion_tokens"])
    choices = []
    for k, spec in enumerate(run.specs):
        ev = run.finished[k]
        if ev.finish_reason not in ("stop", "length"):
            raise _failure(ev)
        text, finish = "".join(texts[k]), ev.finish_reason
        if not shape.chat:
            choices.append({"index": spec.index, "text": spec.echo + text, "logprobs": None, "finish_reason": finish})
            continue
        message = {"role": "assistant", "content": text}
        calls = parse_tool_calls(text, shape.tool_names) if shape.tool_names else None
        if calls:
            message = {"role": "assistant", "content": None,
                       "tool_calls": calls if shape.parallel_tool_calls else calls[:1]}
            finish = "tool_calls"
        choices.append({"index": spec.index, "message": message, "logprobs": None, "finish_reason": finish})
    choices.sort(key=lambda c: c["index"])
    return {"id": shape.rid, "object": "chat.completion" if shape.chat else "text_completion",
            "created": shape.created, "model": shape.model, "choices": choices, "usage": run.usage()}


def stream(request, run: Run, shape: Shape) -> StreamingResponse:
    obj = "chat.completion.chunk" if shape.chat else "text_completion"

    def event(choices, **extra) -> str:
        body = {"id": shape.rid, "object": obj, "created": shape.created, "model": shape.model,
                "choices": choices, **extra}
        if shape.include_usage and "usage" not in body:
            body["usage"] = None
        if shape.obfuscate:  # random padding, so chunk sizes do not reveal the tokens' lengths
            body["obfuscation"] = secrets.token_urlsafe(secrets.randbelow(24) + 1)
        return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"

    def piece(k, text="", finish=None, delta=None):
        index = run.specs[k].index
        if shape.chat:
            return event([{"index": index, "delta": delta if delta is not None else ({"content": text} if text else {}),
                           "logprobs": None, "finish_reason": finish}])
        return event([{"index": index, "text": text, "logprobs": None, "finish_reason": finish}])

    async def events():
        holders = [ToolCallStream(shape.tool_names) if shape.tool_names else None for _ in run.specs]
        try:
            for k, spec in enumerate(run.specs):
                if shape.chat:  # OpenAI's first chunk of a choice announces the role
                    yield piece(k, delta={"role": "assistant", "content": ""})
                elif spec.echo:
                    yield piece(k, spec.echo)
            while len(run.finished) < len(run.specs):
                k, ev, at = await run.events.get()
                run.note(k, ev, at)
                text = holders[k].push(ev.text) if holders[k] else ev.text
                if ev.finish_reason is None:
                    if text:  # (a chat answer's leading spaces become empty pieces)
                        yield piece(k, text)
                    continue
                if ev.finish_reason not in ("stop", "length"):
                    err = _failure(ev).body()
                    yield "data: " + json.dumps(err) + "\n\n"
                    return
                finish, calls = ev.finish_reason, None
                if holders[k]:
                    rest, calls = holders[k].finish()
                    text += rest
                if text:
                    yield piece(k, text)
                if calls:
                    calls = calls if shape.parallel_tool_calls else calls[:1]
                    yield piece(k, delta={"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                    finish = "tool_calls"
                yield piece(k, "", finish)
            u = run.usage()
            request.state.usage = (u["prompt_tokens"], u["completion_tokens"])
            if shape.include_usage:
                yield event([], usage=u)
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            run.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def new_shape(chat: bool, model: str, **kw) -> Shape:
    return Shape(chat=chat, model=model, rid=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                 created=int(time.time()), **kw)
