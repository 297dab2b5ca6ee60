"""`annotated-llama finetune --model PATH --data FILE.json|jsonl --out DIR [--lora]`: Alpaca fine-tuning.

With --lora, DIR becomes a PEFT-format adapter (adapter_config.json + adapter_model.safetensors);
without, a full checkpoint in our dir format. Both runs write DIR/log.jsonl through the shared loop.
"""

import json

from . import argtypes


def add_arguments(p):
    p.add_argument("--model", required=True, help="base model: any checkpoint load_model reads")
    p.add_argument("--data", required=True, help="Alpaca records: a JSON list or JSON Lines file")
    p.add_argument("--out", required=True, help="output dir (an adapter with --lora, else a checkpoint); "
                   "never --model itself")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--template", default="alpaca", choices=["alpaca"], help="prompt template")
    p.add_argument("--max-steps", type=argtypes.positive_int,
                   help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=argtypes.positive_float, default=3.0)
    p.add_argument("--batch-size", type=argtypes.int_range(1, 1 << 20), default=4, help="records per micro-batch")
    p.add_argument("--grad-accum", type=argtypes.int_range(1, 1 << 20), default=1)
    p.add_argument("--lr", type=argtypes.positive_float,
                   help="peak learning rate (default: 3e-4 with --lora, else 2e-5)")
    p.add_argument("--warmup-ratio", type=argtypes.probability, default=0.03)
    p.add_argument("--weight-decay", type=argtypes.nonnegative_float, default=0.0)
    p.add_argument("--max-len", type=argtypes.int_range(1, 1 << 22), default=512,
                   help="tokens per record (prompt + output + EOS)")
    p.add_argument("--lora-r", type=argtypes.int_range(1, 1 << 16), default=8)
    p.add_argument("--lora-alpha", type=argtypes.positive_float, default=16.0)
    p.add_argument("--lora-dropout", type=argtypes.float_range(0.0, 1.0), default=0.05)
    p.add_argument("--lora-targets", default="wq,wv", help="comma-separated wq,wk,wv,wo,w1,w2,w3 (or HF names), "
                   "or 'all'")
    p.add_argument("--ckpt-every", type=argtypes.nonnegative_int, default=0,
                   help="checkpoint every N steps (with --lora each holds the adapter and its optimizer state "
                   "only); 0: only at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest intact checkpoint")
    p.add_argument("--allow-changed-flags", action="store_true",
                   help="with --resume: continue even if run-defining flags (--lr, --batch-size...) changed")
    p.add_argument("--force", action="store_true", help="replace the run or model already in --out")
    p.add_argument("--seed", type=argtypes.seed, default=0)
    p.add_argument("--log-every", type=argtypes.positive_int, default=10)
    p.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")


def run(args):
    from ..train.finetune import FinetuneConfig, finetune
    from ..transforms.lora import parse_targets

    if args.lora:
        parse_targets(args.lora_targets)  # a bad --lora-targets fails before anything loads
    if args.resume and args.force:
        raise ValueError("--resume and --force: choose one (continue the run in --out, or replace it)")
    cfg = argtypes.config_from_args(FinetuneConfig, args, allow_changed=args.allow_changed_flags)
    result = finetune(cfg)
    print(json.dumps(result))
