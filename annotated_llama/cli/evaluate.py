"""`annotated-llama evaluate --model DIR --data DIR|FILE`: validation loss and perplexity."""

import json

from . import argtypes


def add_arguments(p):
    p.add_argument("--model", help="model dir (params.json, model.safetensors, tokenizer.model); "
                                   "default: the embedded default model")
    p.add_argument("--data", required=True, help="token shard dir (from `pretokenize`) or a UTF-8 text file")
    p.add_argument("--split", default="val", choices=["val", "train"], help="which split of a shard dir")
    p.add_argument("--seq-len", type=argtypes.positive_int, default=256)
    p.add_argument("--max-windows", type=argtypes.nonnegative_int, default=32,
                   help="evaluate the first N windows of --seq-len tokens (0: all)")
    p.add_argument("--threads", type=argtypes.positive_int, help="torch threads")


def run(args):
    import torch

    from ..train.evaluation import evaluate_model
    from ..weights import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model
    if path is None:
        from ..default_model import default_model_dir
        path = default_model_dir()
    model, tok = load_model(path, dtype=torch.float32)
    result = evaluate_model(model, args.data, tok, seq_len=args.seq_len, max_windows=args.max_windows or None,
                            split=args.split)
    print(json.dumps(result))
