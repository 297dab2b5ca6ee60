"""`annotated-llama export RUN_DIR|CKPT_DIR OUT_DIR --data SHARD_DIR`: a training checkpoint as a
model dir (params.json, model.safetensors, tokenizer.model) with eval.json, the validation
perplexity measured on the exported weights (train/export.py)."""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("src", help="run dir (its newest checkpoint) or a checkpoint dir")
    p.add_argument("out", help="model dir to write")
    p.add_argument("--data", required=True, help="token shard dir with val.bin")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--log", help="log.jsonl of the run (default: SRC/log.jsonl)")
    p.add_argument("--force", action="store_true", help="replace the model files already in OUT")


def run(args):
    import torch

    from ..train.export import export

    log = args.log or (Path(args.src) / "log.jsonl")
    info = export(args.src, args.out, args.data, getattr(torch, args.dtype), log, force=args.force)
    print(json.dumps(info, indent=2))
