"""`annotated-llama pretrain --data DIR --preset NAME|params.json --out DIR [--resume]`.

One process, or several under `torchrun --nproc_per_node N -m annotated_llama pretrain ... --parallel ddp|fsdp`.
"""

import json

import torch


def add_arguments(p):
    p.add_argument("--data", required=True, help="token shard dir made by `annotated-llama pretokenize`")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --data)")
    p.add_argument("--preset", required=True, help="a ModelArgs preset name, or a params.json path")
    p.add_argument("--out", required=True, help="run dir: log.jsonl and ckpt-NNNNNNN checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16, help="rows per process per micro-batch")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, help="default: 5%% of --max-steps, at most 2000")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-windows", type=int, default=32, help="validation windows of --seq-len per evaluation")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; torchrun sets 1 per process)")


def run(args):
    from ..train.loop import TrainConfig
    from ..train.pretrain import pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(out_dir=args.out, max_steps=args.max_steps, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                      warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      grad_accum=args.grad_accum, dtype=args.dtype, device=args.device, seed=args.seed,
                      log_every=args.log_every, eval_every=args.eval_every, ckpt_every=args.ckpt_every,
                      keep_checkpoints=args.keep_checkpoints, resume=args.resume,
                      activation_checkpointing=args.activation_checkpointing)
    result = pretrain(args.data, args.tokenizer, args.preset, cfg, batch_size=args.batch_size, seq_len=args.seq_len,
                      parallel=args.parallel, eval_windows=args.eval_windows)
    if result is not None:
        print(json.dumps(result))
