"""`annotated-llama eval-instruct --model PATH [--lora DIR] --data heldout.jsonl`: exact-match accuracy.

Greedy replies to each record's Alpaca prompt, compared (stripped) with its `output`; reported overall
and per `task` field, with the share of replies that ended at EOS (a model that never stops scores 0).
"""

import json

from . import argtypes


def add_arguments(p):
    p.add_argument("--model", help="model to evaluate (default: the embedded default model)")
    p.add_argument("--lora", help="PEFT-format LoRA adapter dir applied to --model")
    p.add_argument("--data", required=True, help="Alpaca records with answers (JSON or JSONL), e.g. "
                   "data/instruct/heldout.jsonl")
    p.add_argument("--max-new-tokens", type=argtypes.positive_int, default=24)
    p.add_argument("--batch-size", type=argtypes.positive_int, default=16)
    p.add_argument("--limit", type=argtypes.positive_int, help="evaluate only the first N records")
    p.add_argument("--show", type=argtypes.nonnegative_int, default=0, help="print N wrong replies")
    p.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args):
    import torch

    from .. import load_model
    from ..data.alpaca import load_records
    from ..data.instruct_tasks import evaluate

    records = load_records(args.data)[: args.limit]
    path = args.model
    if path is None:
        from ..default_model import default_model_dir
        path = default_model_dir()
    model, tokenizer = load_model(path, lora=args.lora, device=args.device)
    if tokenizer is None:
        raise FileNotFoundError(f"--model {path}: no tokenizer.model beside the weights")
    with torch.inference_mode():
        report = evaluate(model.float(), tokenizer, records, args.max_new_tokens, args.batch_size)
    rows = report.pop("rows")
    if args.json:
        print(json.dumps(report))
        return
    print(f"exact match: {report['accuracy']:.3f} on {report['n']} records "
          f"(replies ending at EOS: {report['stopped_at_eos']:.3f})")
    for task, r in report["per_task"].items():
        print(f"  {task:<14} {r['accuracy']:.3f}  (n={r['n']})")
    for row in [r for r in rows if not r["correct"]][: args.show]:
        print(f"  [{row['task']}] expected {row['output']!r}, got {row['reply']!r}")
