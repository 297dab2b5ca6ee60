"""Self-instruct's prompt (self_instruct.py): the numbered task layout, and fitting it to the
served model's context.

When the endpoint reports its context (`max_model_len` in /v1/models, as our server and vLLM do),
each prompt is fitted to it: fewer example tasks, then a shorter instruction head, and
`max_tokens` cut to the room left, counted with the endpoint's /tokenize where it has one (else
estimated at two bytes a token). The default model's 256 tokens hold the short head and one
example, and about a hundred tokens of reply.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.request

NO_INPUT = "<noinput>"

PROMPT_HEAD = """You are asked to come up with a set of {total} diverse task instructions. These task instructions \
will be given to a language model, and we will evaluate it on how well it completes them.

Requirements:
1. Do not repeat a verb across instructions; vary the wording.
2. Vary the kind of task: open questions, classification, rewriting, counting, arithmetic, \
short facts, list manipulation, continuing a text, and so on.
3. Every task must be doable by a language model from text alone: nothing to see, hear, draw or \
open, and no actions in the world.
4. Instructions are in English, one or two sentences, imperative or questions.
5. Where a task needs one, give an input of at most 100 words that is real content, not a \
placeholder. Otherwise write "{no_input}" as the input.
6. The output is a correct, complete answer of at most 100 words.

List of {total} tasks:
"""


SHORT_HEAD = ("Write {total} new, varied tasks for a language model, each an instruction, an input (or "
              "{no_input}) and an output, numbered like these:\n")
MIN_REPLY = 32  # tokens: less room than this after the prompt cannot hold one task


def format_task(i: int, task: dict) -> str:
    return (f"###\n{i}. Instruction: {task['instruction']}\n{i}. Input:\n{task.get('input') or NO_INPUT}\n"
            f"{i}. Output:\n{task['output']}\n")


def encode_prompt(examples: list[dict], total: int, short: bool = False) -> tuple[str, str]:
    """(prompt, the text it ends with that the reply continues: the next task's header)."""
    body = "".join(format_task(i + 1, t) for i, t in enumerate(examples))
    lead = f"###\n{len(examples) + 1}. Instruction:"
    head = SHORT_HEAD if short else PROMPT_HEAD
    return head.format(total=total, no_input=NO_INPUT) + body + lead, lead


def _root(cfg) -> str:
    base = cfg.endpoint.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


def context_window(client, cfg) -> int | None:
    """The served model's context in tokens, if the endpoint says (`max_model_len`), else None."""
    try:
        models = client.models.list().data
    except Exception:  # not every endpoint lists models; then nothing is adapted
        return None
    chosen = next((m for m in models if m.id == cfg.model), models[0] if len(models) == 1 else None)
    n = getattr(chosen, "max_model_len", None) if chosen is not None else None
    return n if isinstance(n, int) and n > 0 else None


def token_counter(cfg):
    """count(prompt) -> tokens as the endpoint will see the request: its /tokenize (ours, vLLM's),
    with the chat template for the chat API; else an estimate of two bytes a token plus 16."""
    url = _root(cfg) + "/tokenize"
    headers = {"Authorization": f"Bearer {cfg.api_key or os.environ.get('OPENAI_API_KEY') or 'none'}",
               "Content-Type": "application/json"}
    works = [True]

    def count(prompt: str) -> int:
        if works[0]:
            body = {"model": cfg.model, **({"prompt": prompt} if cfg.api == "completions" else
                                           {"messages": [{"role": "user", "content": prompt}]})}
            request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
            try:  # a 4xx/5xx answer is an HTTPError: an OSError, as a refused connection or a timeout is
                with urllib.request.urlopen(request, timeout=cfg.timeout) as r:
                    reply = json.loads(r.read()) if r.status == 200 else None
                if isinstance(reply, dict) and isinstance(reply.get("count"), int):
                    return reply["count"]
            except (OSError, ValueError, http.client.HTTPException):
                pass
            works[0] = False  # no /tokenize here: estimate from now on
        return len(prompt.encode("utf-8")) // 2 + 16
    return count


def fit_prompt(examples: list[dict], total: int, n_ctx: int, max_tokens: int, count) -> tuple[str, str, int]:
    """The longest prompt that leaves a reply room in `n_ctx`: all examples under the full head,
    then fewer, then the short head; with max_tokens cut to the room left."""
    for short in (False, True):
        for k in range(len(examples), 0, -1):
            prompt, lead = encode_prompt(examples[:k], total, short)
            room = n_ctx - count(prompt)
            if room >= MIN_REPLY:
                return prompt, lead, min(max_tokens, room)
    raise ValueError(f"the model's context of {n_ctx} tokens cannot hold a prompt with one example task and "
                     f"{MIN_REPLY} tokens of reply")
