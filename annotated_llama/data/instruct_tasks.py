"""An instruction set we can measure: Alpaca records with checkable answers, made from the Bible.

Self-instruct data (self_instruct.py) has no right answers to score against. These tasks do: each
record's `output` is the one correct reply, so held-out exact-match accuracy measures what
instruction tuning taught. Tasks are small enough for a few-million-parameter model, and mix
skills: recalling the corpus (continue a verse, which book), copying from the input (first and last
word, reversing a list), counting, and small arithmetic. Each record carries a `task` field (Alpaca
loaders ignore extra fields; the evaluation groups by it).

The split is fixed by a seed. Held-out records share no source sentence and no (instruction, input)
pair with the training records, so arithmetic is scored on sums the fine-tune never saw.

`more_train` adds training records drawn *after* the split is made, from a second random stream,
so the held-out split (and the first `n_train` records per task) stay exactly what they were. The
extra draws use wider variants of two tasks: sums and differences of operands up to 20 (the held-out
questions stay one-digit and unseen), and any sentence of the four books (not only the quote-free
ones), never a held-out sentence.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import torch

from ..core.sampling import SamplingParams
from ..inference.engine import Engine
from .alpaca import render_prompt

# Four books of clearly different genres (narrative, law, war stories, poetry).
BOOKS = ("Genesis", "Leviticus", "Judges", "Job")
# Words for the list task: frequent concrete nouns of the corpus.
NOUNS = ("bread", "water", "wine", "oil", "gold", "silver", "sheep", "goat", "ox", "camel", "donkey", "lamb",
         "tent", "altar", "stone", "tree", "river", "field", "city", "gate", "house", "sword", "bow", "cloak",
         "ring", "lamp", "cup", "bowl", "knife", "rope", "cedar", "olive", "fig", "grape", "honey", "salt")
SENTENCE = re.compile(r"(?<=[.!?])\s+")
HEADING = re.compile(r"^(.+?) (\d+)$")
PLAIN = re.compile(r"^[A-Z][A-Za-z ,;’']*[A-Za-z][.!?]$")  # no quotation marks: answers stay unambiguous


def read_bible(text: str) -> list[tuple[str, int, list[str]]]:
    """[(book, chapter, sentences)] from the corpus layout: a `Book N` line, then the chapter's text."""
    chapters, book, chapter = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = HEADING.match(line)
        if m and len(line) < 30:
            book, chapter = m.group(1), int(m.group(2))
        elif book is not None:
            chapters.append((book, chapter, SENTENCE.split(line)))
    return chapters


def words(s: str) -> list[str]:
    return re.findall(r"[A-Za-z’']+", s)


# ---- the tasks: each (rng, sentence pool) -> (instruction, input, output) ----------------------

def task_book(rng, pool):
    book, s = rng.choice(pool["by_book"])
    return f"Which book is this verse from? Answer {', '.join(BOOKS[:-1])} or {BOOKS[-1]}.", s, book


def task_continue(rng, pool):
    w = rng.choice(pool["plain"]).split()
    k = rng.randint(3, len(w) - 2)
    return "Continue this verse with its next two words.", " ".join(w[:k]), " ".join(w[k:k + 2]).strip(",;:.!?")


def task_first_word(rng, pool):
    s = rng.choice(pool["plain"])
    return "What is the first word of this verse?", s, words(s)[0]


def task_last_word(rng, pool):
    s = rng.choice(pool["plain"])
    return "What is the last word of this verse?", s, words(s)[-1]


def task_count_words(rng, pool):
    w = rng.choice(pool["plain"]).rstrip(".!?").replace(",", "").replace(";", "").split()
    n = rng.randint(2, min(7, len(w)))
    start = rng.randint(0, len(w) - n)
    return "How many words are in this text?", " ".join(w[start:start + n]), str(n)


def task_reverse_list(rng, pool):
    items = rng.sample(NOUNS, rng.randint(3, 4))
    return "Reverse the order of this list.", ", ".join(items), ", ".join(reversed(items))


def _arithmetic(rng, top):
    a, b = rng.randint(0, top), rng.randint(0, top)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", "", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", "", str(a - b)


def task_arithmetic(rng, pool):  # one-digit operands: the held-out questions
    return _arithmetic(rng, 9)


def task_arithmetic_wide(rng, pool):  # the extra training draws go up to 20
    return _arithmetic(rng, 20)


TASKS = {"book": task_book, "continue": task_continue, "first_word": task_first_word,
         "last_word": task_last_word, "count_words": task_count_words, "reverse_list": task_reverse_list,
         "arithmetic": task_arithmetic}
MORE_TASKS = {**TASKS, "arithmetic": task_arithmetic_wide}  # the extra training draws (module docstring)


def _pools(chapters, rng, heldout_fraction):
    plain = [(b, s) for b, _, ss in chapters for s in ss if PLAIN.match(s) and 6 <= len(s.split()) <= 20]
    rng.shuffle(plain)
    n_held = max(1, int(len(plain) * heldout_fraction))
    pools = []
    for part in (plain[:n_held], plain[n_held:]):
        pools.append({"plain": [s for _, s in part], "by_book": [(b, s) for b, s in part if b in BOOKS]})
    return pools  # (held-out pool, training pool): no sentence in both


def _more_pool(chapters, held_pool):
    """The pool of the extra training draws: the training pool without any sentence whose text is
    also a held-out sentence (the corpus repeats some verses), and, for `book`, every sentence of
    the four books of 6 to 30 words."""
    held = set(held_pool["plain"])
    plain = sorted({s for _, _, ss in chapters for s in ss if PLAIN.match(s) and 6 <= len(s.split()) <= 20} - held)
    by_book = sorted({(b, s.strip()) for b, _, ss in chapters if b in BOOKS for s in ss
                      if 6 <= len(s.split()) <= 30 and s.strip() not in held})
    return {"plain": plain, "by_book": by_book}


def leaks(record: dict, held_sentences: set, held_pairs: set) -> bool:
    """Whether a training record would give away a held-out one: the same (instruction, input), an
    input that is a held-out sentence or a held-out record's input (pass both in `held_sentences`;
    the corpus repeats some sentences, so a `count_words` phrase can spell out a held-out `continue`
    answer), or, for `continue`, the start of a held-out sentence."""
    inp = record["input"]
    if (record["instruction"], inp) in held_pairs:
        return True
    return bool(inp) and (inp in held_sentences or (record["task"] == "continue" and
                                                    any(h.startswith(inp + " ") for h in held_sentences)))


def _draw(make, rng, pool, n, name, seen):
    out = []
    for _ in range(50 * n):  # give up on duplicates after a while
        if len(out) == n:
            break
        instruction, inp, output = make(rng, pool)
        if (instruction, inp) not in seen and output:
            seen.add((instruction, inp))
            out.append({"instruction": instruction, "input": inp, "output": output, "task": name})
    return out


def make_records(corpus_text: str, n_train: int, n_heldout: int, seed: int = 0, tasks=None, more_train=0):
    """(train, heldout) lists of records, n_train and n_heldout per task (fewer only if a task
    runs out of distinct records), fixed by `seed`. `more_train` (an int, or {task: int}) adds
    that many extra training records per task (module docstring); held-out is unaffected."""
    rng = random.Random(seed)
    chapters = read_bible(corpus_text)
    held_pool, train_pool = _pools(chapters, rng, heldout_fraction=0.15)
    train, heldout, seen = [], [], {}
    for name in tasks or TASKS:
        seen[name] = set()
        # held-out first, so arithmetic's few sums go to held-out too
        heldout += _draw(TASKS[name], rng, held_pool, n_heldout, name, seen[name])
        train += _draw(TASKS[name], rng, train_pool, n_train, name, seen[name])
    rng.shuffle(train)
    if not more_train:
        return train, heldout
    # Everything above is the original split, untouched. The extra draws come from their own stream.
    held_sentences = set(held_pool["plain"]) | {r["input"] for r in heldout if r["input"]}
    held_pairs = {(r["instruction"], r["input"]) for r in heldout}
    train = [r for r in train if not leaks(r, held_sentences, held_pairs)]
    more_rng, more_pool = random.Random(f"{seed}-more"), _more_pool(chapters, held_pool)
    for name in tasks or TASKS:
        n = more_train.get(name, 0) if isinstance(more_train, dict) else more_train
        extra = _draw(MORE_TASKS[name], more_rng, more_pool, n, name, seen[name])
        train += [r for r in extra if not leaks(r, held_sentences, held_pairs)]
    more_rng.shuffle(train)
    return train, heldout


# ---- evaluation -------------------------------------------------------------------------------

def evaluate(model, tokenizer, records: list[dict], max_new_tokens: int = 24, batch_size: int = 16) -> dict:
    """Exact match of the greedy reply (stripped) against `output`, overall and per task."""
    model.eval()
    hits, totals, stops, rows = defaultdict(int), defaultdict(int), 0, []
    # the engine batches the records itself (continuously: a finished reply frees its row at once)
    engine = Engine(model, tokenizer, max_batch_size=batch_size)
    prompts = [tokenizer.encode(render_prompt(r), bos=True, eos=False) for r in records]
    with torch.inference_mode():
        seqs = engine.run(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens))
    for r, seq in zip(records, seqs):
        reply = tokenizer.decode(seq.output).strip()
        ok = reply == r["output"].strip()
        stopped = seq.finish_reason == "stop"  # ended at a stop id (EOS), not at the token budget
        task = r.get("task", "all")
        hits[task] += ok
        totals[task] += 1
        stops += stopped
        rows.append({"task": task, "output": r["output"], "reply": reply, "correct": ok, "stopped": stopped})
    n = sum(totals.values())
    return {"accuracy": sum(hits.values()) / max(n, 1), "n": n, "stopped_at_eos": stops / max(n, 1),
            "per_task": {t: {"accuracy": hits[t] / totals[t], "n": totals[t]} for t in sorted(totals)},
            "rows": rows}
