"""`annotated-llama pretokenize CORPUS... --tokenizer PATH --out DIR`: token shards for training."""

import json
import sys


def add_arguments(p):
    p.add_argument("corpus", nargs="+", help="UTF-8 text files (.txt, or .xz compressed)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json, tokenizer.model")
    p.add_argument("--val-every", type=int, default=40,
                   help="hold out every N-th document (whole paragraphs/chapters) for validation")


def run(args):
    from ..train.data import pretokenize

    meta = pretokenize(args.corpus, args.tokenizer, args.out, val_every=args.val_every,
                       progress=sys.stderr.isatty())
    print(json.dumps(meta))
