"""`annotated-llama pretokenize CORPUS... --tokenizer PATH --out DIR`: token shards for training."""

import json
import sys

from . import argtypes


def add_arguments(p):
    p.add_argument("corpus", nargs="+", help="UTF-8 text files (.txt, or .xz compressed)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model")
    p.add_argument("--out", required=True, help="directory for train.bin, val.bin, meta.json, tokenizer.model")
    p.add_argument("--val-every", type=argtypes.positive_int, default=40,
                   help="hold out every N-th document (whole paragraphs/chapters) for validation")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args):
    from ..core.outputs import check_output, replacing
    from ..data.pretokenize import pretokenize

    out = check_output(args.out, force=args.force, inputs=[*args.corpus, args.tokenizer])
    with replacing(out, directory=True) as tmp:  # the old shards stay until the new ones are complete
        meta = pretokenize(args.corpus, args.tokenizer, tmp, val_every=args.val_every,
                           progress=sys.stderr.isatty())
    print(json.dumps(meta))
