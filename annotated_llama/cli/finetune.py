"""`annotated-llama finetune --model PATH --data FILE.json|jsonl --out DIR [--lora]`: Alpaca fine-tuning.

With --lora, DIR becomes a PEFT-format adapter (adapter_config.json + adapter_model.safetensors);
without, a full checkpoint in our dir format. Both runs write DIR/log.jsonl through the shared loop.
"""

import json


def add_arguments(p):
    p.add_argument("--model", required=True, help="base model: any checkpoint load_model reads")
    p.add_argument("--data", required=True, help="Alpaca records: a JSON list or JSON Lines file")
    p.add_argument("--out", required=True, help="output dir (an adapter with --lora, else a checkpoint)")
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter instead of all weights")
    p.add_argument("--template", default="alpaca", choices=["alpaca"], help="prompt template")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: --epochs passes over the data)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=4, help="records per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, help="peak learning rate (default: 3e-4 with --lora, else 2e-5)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-len", type=int, default=512, help="tokens per record (prompt + output + EOS)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lora-targets", default="wq,wv", help="comma-separated wq,wk,wv,wo,w1,w2,w3 (or HF names), "
                   "or 'all'")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (with --lora each holds "
                   "the adapter so far); 0: only at the end")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")


def run(args):
    from ..finetune import FinetuneConfig, finetune
    from ..lora import parse_targets

    if args.lora:
        parse_targets(args.lora_targets)  # a bad --lora-targets fails before anything loads
    for name in ("max_steps", "batch_size", "grad_accum", "max_len", "lora_r"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    cfg = FinetuneConfig(
        model=args.model, data=args.data, out=args.out, lora=args.lora, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=args.lora_targets,
        max_steps=args.max_steps, epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, max_len=args.max_len,
        seed=args.seed, dtype=args.dtype, device=args.device, log_every=args.log_every, template=args.template,
        ckpt_every=args.ckpt_every, resume=args.resume)
    result = finetune(cfg)
    print(json.dumps(result))
