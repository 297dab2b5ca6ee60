"""Self-instruct: grow an instruction set from a few seed tasks with any OpenAI-compatible model.

Wang et al. 2022 ("Self-Instruct", arxiv/2212.10560), as simplified by stanford_alpaca's
generate_instruction.py: show the model a few tasks, ask for a numbered list of new ones in the same
layout, parse the reply, and keep a new instruction only if it is usable (not too short or long, no
task a text model cannot do such as drawing or reading a file, English, not starting with
punctuation) and not a near-duplicate of anything kept (ROUGE-L >= 0.7, Lin 2004, via the
`rouge-score` package). The prompt's wording is ours; the rules are stanford_alpaca's.

Small contexts: each prompt is fitted to the served model's context where the endpoint reports
it (fewer example tasks, a shorter head, a smaller max_tokens; self_instruct_prompt.py).

Robustness: requests go through the official `openai` client (so our `serve`, vLLM, llama.cpp's
server or a hosted API all work), `batch` at a time in threads, each retried with exponential
back-off on 429, 5xx and connection errors. Kept records are appended to a JSONL file; after each
round a state file is replaced atomically with the counters and the file's committed length. A
killed run resumes from the state: bytes past the committed length (a round that was cut off) are
cut, so no record is lost or written twice.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .alpaca import load_records, validate_record
from .self_instruct_prompt import NO_INPUT, context_window, encode_prompt, fit_prompt, token_counter

# stanford_alpaca's blacklist: tasks a language model cannot do from text alone.
FORBIDDEN = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
             "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
MIN_WORDS, MAX_WORDS = 4, 150  # stanford_alpaca drops instructions of <= 3 or > 150 words
ROUGE_THRESHOLD = 0.7

# ---- parsing the numbered reply ---------------------------------------------------------------

TASK = re.compile(r"^\s*(\d+)\s*\.\s*Instruction:\s*(?P<instruction>.*?)\s*^\s*\1\s*\.\s*Input:\s*(?P<input>.*?)"
                  r"\s*^\s*\1\s*\.\s*Output:\s*(?P<output>.*?)\s*\Z", re.S | re.M)
SPLIT = re.compile(r"^\s*#{3,}\s*$|(?=^\s*\d+\s*\.\s*Instruction:)", re.M)


def parse_reply(text: str, finish_reason: str = "stop") -> tuple[list[dict], Counter]:
    """Tasks found in a reply, and a Counter of the pieces that could not be used
    ("malformed", or "truncated" for the last one when the reply hit max_tokens)."""
    pieces = [p for p in SPLIT.split(text) if p and p.strip()]
    tasks, bad = [], Counter()
    for k, piece in enumerate(pieces):
        if k == len(pieces) - 1 and finish_reason == "length":
            bad["truncated"] += 1  # cut off mid-task by max_tokens (stanford_alpaca drops it too)
            continue
        m = TASK.match(piece.strip("\n"))
        if m is None:
            bad["malformed"] += 1
            continue
        inp = m["input"].strip()
        tasks.append({"instruction": m["instruction"].strip(), "input": "" if inp.lower() == NO_INPUT else inp,
                      "output": m["output"].strip()})
    return tasks, bad


# ---- filters -------------------------------------------------------------------------------------

def discard_reason(task: dict) -> str | None:
    """Why a parsed task is unusable (stanford_alpaca's rules), or None."""
    inst = task["instruction"]
    n = len(inst.split())
    if n < MIN_WORDS:
        return "too_short"
    if n > MAX_WORDS:
        return "too_long"
    low = inst.lower()
    if any(re.search(rf"\b{re.escape(w)}\b", low) for w in FORBIDDEN):
        return "forbidden_keyword"
    if low.startswith("write a program"):  # stanford_alpaca: often unanswerable as text
        return "program"
    if inst[0] in string.punctuation:
        return "starts_with_punctuation"
    letters = [c for c in inst if c.isalpha()]
    if not inst[0].isascii() or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return "non_english"
    if not task["output"].strip():
        return "empty_output"
    return None


class Deduplicator:
    """ROUGE-L F-measure against every instruction kept so far (rouge-score's tokenizer)."""

    def __init__(self, threshold: float = ROUGE_THRESHOLD):
        from rouge_score import rouge_scorer  # here: the self-instruct extra, not installed by default (and ~2 s)

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.threshold = threshold
        self.kept: list[str] = []

    def most_similar(self, text: str) -> float:
        return max((self.scorer.score(k, text)["rougeL"].fmeasure for k in self.kept), default=0.0)

    def is_duplicate(self, text: str) -> bool:
        return self.most_similar(text) >= self.threshold

    def add(self, text: str):
        self.kept.append(text)


# ---- seed tasks -------------------------------------------------------------------------------

def load_seed_tasks(path) -> list[dict]:
    """Alpaca-format records, or stanford_alpaca's seed_tasks.jsonl (`instances` with input/output)."""

    path = Path(path)
    raw = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"--seed-tasks {path}: no such file") from None
    if any('"instances"' in line for line in lines):
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                try:
                    t = json.loads(line)
                    raw.append({"instruction": t["instruction"], **t["instances"][0]})
                except (json.JSONDecodeError, KeyError, IndexError, TypeError) as e:
                    raise ValueError(f"--seed-tasks {path}: line {lineno}: not a seed task ({e})") from None
        tasks = [validate_record(t, f"{path}: task {i}") for i, t in enumerate(raw)]
    else:
        tasks = load_records(path)
    if not tasks:
        raise ValueError(f"--seed-tasks {path}: no tasks")
    return [{k: t[k] for k in ("instruction", "input", "output")} for t in tasks]


# ---- the loop ---------------------------------------------------------------------------------

@dataclass
class Config:
    seed_tasks: str
    out: str
    num: int
    endpoint: str
    model: str
    api_key: str | None = None
    batch: int = 4  # concurrent requests per round
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    prompt_tasks: int = 3  # examples shown per request (stanford_alpaca: 3)
    total_tasks: int = 20  # tasks asked for per request, examples included (stanford_alpaca: 20)
    api: str = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    max_requests: int | None = None  # None: 10 + 2 * num (a model that never complies stops here)
    max_retries: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubled each time
    timeout: float = 600.0
    seed: int = 0
    log: object = field(default=sys.stderr, repr=False)


class EndpointError(OSError):
    """The endpoint refused or kept failing; one line, the CLI prints it without a traceback."""


def _client(cfg: Config):
    from openai import OpenAI  # here: the self-instruct extra, not installed by default (and ~1 s)

    base = cfg.endpoint.rstrip("/")
    if re.fullmatch(r"https?://[^/]+", base):  # a bare host: the API lives under /v1
        base += "/v1"
    # retries are ours (below), so they can be counted and reported
    return OpenAI(base_url=base, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY") or "none",
                  max_retries=0, timeout=cfg.timeout)


def request(client, cfg: Config, prompt: str, lead: str, stats: Counter, max_tokens: int | None = None
            ) -> tuple[str, str]:
    """(reply text including the task header the prompt ended with, finish_reason), with retries."""
    import openai  # here: the self-instruct extra, not installed by default

    for attempt in range(cfg.max_retries + 1):
        try:
            if cfg.api == "completions":
                r = client.completions.create(model=cfg.model, prompt=prompt, max_tokens=max_tokens or cfg.max_tokens,
                                              temperature=cfg.temperature, top_p=cfg.top_p)
                choice = r.choices[0]
                return lead + (choice.text or ""), choice.finish_reason or "stop"
            r = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens or cfg.max_tokens, temperature=cfg.temperature,
                                               top_p=cfg.top_p)
            choice = r.choices[0]
            text = choice.message.content or ""
            # a chat model usually restarts the list; if it just continues, put the header back
            if not re.match(r"\s*(#{3,}|\d+\s*\.\s*Instruction:)", text):
                text = lead + " " + text
            return text, choice.finish_reason or "stop"
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as e:
            # 429, 5xx, refused/timed-out connections: worth another try after a pause
            if attempt == cfg.max_retries:
                raise EndpointError(f"{cfg.endpoint}: gave up after {cfg.max_retries} retries: {_one_line(e)}") \
                    from None
            stats["retries"] += 1
            time.sleep(cfg.backoff * 2 ** attempt * (1 + 0.25 * random.random()))
        except openai.APIStatusError as e:  # 4xx other than 429: retrying will not help
            raise EndpointError(f"{cfg.endpoint}: HTTP {e.status_code}: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _write_state(path: Path, state: dict):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a kill leaves the old state or the new, never half of one


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.json")


def _open_run(cfg: Config, out: Path, sp: Path) -> tuple[dict, list[dict]]:
    """The state and kept records of an earlier run of the same output, or a fresh state."""
    if not sp.exists():
        if out.exists() and out.stat().st_size > 0:
            raise FileExistsError(f"--out {out}: exists without {sp.name}; not overwriting it (choose another --out)")
        return {"version": 1, "bytes": 0, "requests": 0, "parsed": 0, "kept": 0, "retries": 0,
                "discarded": {}, "model": cfg.model}, []
    try:
        state = json.loads(sp.read_text())
        committed = int(state["bytes"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{sp}: not a self-instruct state file ({e})") from None
    size = out.stat().st_size if out.exists() else 0
    if size < committed:
        raise ValueError(f"--out {out}: shorter ({size} bytes) than its state says ({committed}); it was changed")
    if size > committed:  # the last round was cut off by a kill: it was never counted, so cut it
        with open(out, "r+b") as f:
            f.truncate(committed)
        print(f"self-instruct: resuming; dropped {size - committed} bytes of an unfinished round", file=cfg.log)
    with open(out, encoding="utf-8") as f:
        kept = [json.loads(line) for line in f if line.strip()]
    if len(kept) != state["kept"]:
        raise ValueError(f"--out {out}: holds {len(kept)} records but {sp.name} says {state['kept']}")
    return state, kept


def run(cfg: Config) -> dict:
    """Generate until `num` records are kept (or max_requests are spent); returns the report."""
    if cfg.num < 1 or cfg.batch < 1:
        raise ValueError("--num and --batch must be at least 1")
    seeds = load_seed_tasks(cfg.seed_tasks)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sp = state_path(out)
    state, kept = _open_run(cfg, out, sp)
    dedup = Deduplicator()
    for t in seeds + kept:  # stanford_alpaca compares against the seeds too
        dedup.add(t["instruction"])
    max_requests = cfg.max_requests or 10 + 2 * cfg.num
    client = _client(cfg)
    stats = Counter({"retries": state["retries"]})
    discarded = Counter(state["discarded"])
    n_examples = min(cfg.prompt_tasks, cfg.total_tasks - 1)

    n_ctx = context_window(client, cfg)
    count = token_counter(cfg) if n_ctx else None

    def prompt_for(i: int) -> tuple[str, str, int]:
        # request i's examples depend only on (seed, i) and what was kept before its round: resumable
        rng = random.Random(f"{cfg.seed}-{i}")
        n_gen = min(len(kept), n_examples // 3)  # mostly human-written seeds, some generated
        examples = rng.sample(seeds, min(len(seeds), n_examples - n_gen)) + rng.sample(kept, n_gen)
        if n_ctx is None:
            return (*encode_prompt(examples, cfg.total_tasks), cfg.max_tokens)
        return fit_prompt(examples, cfg.total_tasks, n_ctx, cfg.max_tokens, count)

    with ThreadPoolExecutor(max_workers=cfg.batch) as pool:
        while state["kept"] < cfg.num and state["requests"] < max_requests:
            first = state["requests"]
            ids = range(first, min(first + cfg.batch, max_requests))
            prompts = [prompt_for(i) for i in ids]
            replies = list(pool.map(lambda p: request(client, cfg, p[0], p[1], stats, p[2]), prompts))
            new_lines = []
            for text, finish in replies:
                tasks, bad = parse_reply(text, finish)
                discarded.update(bad)
                state["parsed"] += len(tasks)
                for t in tasks:
                    reason = discard_reason(t)
                    if reason is None and dedup.is_duplicate(t["instruction"]):
                        reason = "rouge_duplicate"
                    if reason is None and state["kept"] + len(new_lines) >= cfg.num:
                        reason = "over_target"
                    if reason is not None:
                        discarded[reason] += 1
                        continue
                    dedup.add(t["instruction"])
                    kept.append(t)
                    new_lines.append(json.dumps(t, ensure_ascii=False) + "\n")
            with open(out, "a", encoding="utf-8") as f:  # append the round, then commit it in the state
                f.write("".join(new_lines))
                f.flush()
                os.fsync(f.fileno())
            state.update(bytes=out.stat().st_size, requests=first + len(prompts), kept=state["kept"] + len(new_lines),
                         retries=stats["retries"], discarded=dict(sorted(discarded.items())))
            _write_state(sp, state)
            print(f"self-instruct: {state['requests']} requests, {state['parsed']} parsed, {state['kept']}/{cfg.num} "
                  f"kept", file=cfg.log)
    report = {"requested": state["requests"], "parsed": state["parsed"], "kept": state["kept"],
              "discarded": state["discarded"], "retries": state["retries"], "out": str(out),
              "complete": state["kept"] >= cfg.num}
    return report
