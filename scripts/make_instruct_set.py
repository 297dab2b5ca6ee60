"""Write the measured instruction set: data/instruct/{train,heldout}.jsonl.

    python scripts/make_instruct_set.py [--corpus FILE] [--train-per-task 200] [--heldout-per-task 30] [--seed 0]

The corpus defaults to the repo's data/world-english-bible.txt.xz.
The output is fixed by the seed (annotated_llama/data/instruct_tasks.py says how the split is made).
"""

import argparse
import json
import lzma
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing  # noqa: E402

from annotated_llama.data.instruct_tasks import make_records  # noqa: E402

CANDIDATES = [ROOT / "data" / "world-english-bible.txt.xz"]


def read_text(path: Path) -> str:
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8").read()
    return path.read_text(encoding="utf-8")


def write_jsonl(records, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "instruct")
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--heldout-per-task", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    corpus = args.corpus or next((c for c in CANDIDATES if c.exists()), None)
    if corpus is None or not corpus.exists():
        sys.exit(f"make_instruct_set: no corpus found (tried {', '.join(map(str, CANDIDATES))}); pass --corpus")
    train, heldout = make_records(read_text(corpus), args.train_per_task, args.heldout_per_task, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(heldout, args.out / "heldout.jsonl")
    count = lambda rs: dict(sorted(Counter(r["task"] for r in rs).items()))  # noqa: E731
    print(f"{corpus}: train {len(train)} {count(train)}; heldout {len(heldout)} {count(heldout)} -> {args.out}")


if __name__ == "__main__":
    main()
