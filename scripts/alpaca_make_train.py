"""Regenerate data/instruct/train.jsonl, larger, leaving data/instruct/heldout.jsonl exactly as it is.

    python scripts/alpaca_make_train.py [--more-per-task N] [--corpus FILE] [--seed 0]

The held-out split is fixed (scripts/make_instruct_set.py wrote it with 200 training and 30 held-out
records per task, seed 0). This script redraws that split with the same generator and seed, checks
that it equals the committed heldout.jsonl byte for byte (so the before/after numbers stay
comparable), then adds `make_records(..., more_train=...)` extra training records drawn from their
own random stream. It checks that no training record leaks a held-out one (same question, or a
held-out sentence as input) and writes train.jsonl only (temporary name, then rename).
"""

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing  # noqa: E402
sys.path.insert(0, str(ROOT / "scripts"))  # noqa: E402

from annotated_llama.data.instruct_tasks import _pools, leaks, make_records, read_bible  # noqa: E402
from make_instruct_set import CANDIDATES, read_text  # noqa: E402

# Per task: the copying and counting tasks can use many records; `book` runs out near 4,000 distinct
# sentences of the four books; arithmetic has about 650 questions with operands up to 20.
MORE = {"book": 4000, "continue": 3000, "first_word": 2500, "last_word": 2500, "count_words": 3000,
        "reverse_list": 3000, "arithmetic": 700}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "instruct")
    p.add_argument("--more-per-task", type=int, help="extra training records per task (default: MORE, per task)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    corpus = args.corpus or next((c for c in CANDIDATES if c.exists()), None)
    if corpus is None or not corpus.exists():
        sys.exit(f"alpaca_make_train: no corpus found (tried {', '.join(map(str, CANDIDATES))}); pass --corpus")
    text = read_text(corpus)
    more = MORE if args.more_per_task is None else args.more_per_task
    train, heldout = make_records(text, 200, 30, args.seed, more_train=more)

    held_path = args.out / "heldout.jsonl"
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in heldout)
    if not held_path.is_file() or held_path.read_text(encoding="utf-8") != expected:
        sys.exit(f"alpaca_make_train: {held_path} is not the split this generator makes with seed {args.seed}; "
                 "refusing to write a training split for another held-out set")
    import random
    held_pool, _ = _pools(read_bible(text), random.Random(args.seed), heldout_fraction=0.15)
    held_sentences = set(held_pool["plain"]) | {r["input"] for r in heldout if r["input"]}
    held_pairs = {(r["instruction"], r["input"]) for r in heldout}
    bad = [r for r in train if leaks(r, held_sentences, held_pairs)]
    if bad:
        sys.exit(f"alpaca_make_train: {len(bad)} training records leak held-out ones, e.g. {bad[0]}")

    path = args.out / "train.jsonl"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), encoding="utf-8")
    os.replace(tmp, path)
    count = dict(sorted(Counter(r["task"] for r in train).items()))
    print(f"{corpus}: train {len(train)} {count} -> {path} ({path.stat().st_size / 1e6:.1f} MB); "
          f"held-out {len(heldout)} unchanged")


if __name__ == "__main__":
    main()
