"""`annotated-llama pretrain --data DIR --preset NAME|params.json --out DIR [--resume]`.

One process; several with `--nproc-per-node N` (started through torch.distributed.run, quietly:
a bad input is one line); or under `torchrun --nproc_per_node N -m annotated_llama pretrain ...
--parallel ddp|fsdp`, where torchrun adds its own failure summary to a rank's one line.
"""

import json
import os
import sys

from . import argtypes


def add_arguments(p):
    p.add_argument("--data", required=True, help="token shard dir made by `annotated-llama pretokenize`")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --data)")
    p.add_argument("--preset", required=True, help="a ModelArgs preset name, or a params.json path")
    p.add_argument("--out", required=True, help="run dir: log.jsonl and ckpt-NNNNNNN checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    p.add_argument("--allow-changed-flags", action="store_true",
                   help="with --resume: continue even if run-defining flags (--lr, --batch-size...) changed")
    p.add_argument("--force", action="store_true", help="replace the run already in --out (its checkpoints go)")
    p.add_argument("--max-steps", type=argtypes.positive_int, default=1000)
    p.add_argument("--batch-size", type=argtypes.int_range(1, 1 << 20), default=16,
                   help="rows per process per micro-batch")
    p.add_argument("--seq-len", type=argtypes.int_range(1, 1 << 22), default=256)
    p.add_argument("--grad-accum", type=argtypes.int_range(1, 1 << 20), default=1)
    p.add_argument("--lr", type=argtypes.positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=argtypes.probability, default=0.1)
    p.add_argument("--warmup-steps", type=argtypes.positive_int, help="default: 5%% of --max-steps, at most 2000")
    p.add_argument("--weight-decay", type=argtypes.nonnegative_float, default=0.1)
    p.add_argument("--grad-clip", type=argtypes.nonnegative_float, default=1.0)
    p.add_argument("--eval-every", type=argtypes.nonnegative_int, default=0)
    p.add_argument("--eval-windows", type=argtypes.positive_int, default=32,
                   help="validation windows of --seq-len per evaluation")
    p.add_argument("--ckpt-every", type=argtypes.nonnegative_int, default=0)
    p.add_argument("--keep-checkpoints", type=argtypes.positive_int, default=2)
    p.add_argument("--log-every", type=argtypes.positive_int, default=10)
    p.add_argument("--seed", type=argtypes.seed, default=0)
    p.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="autocast dtype")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"])
    p.add_argument("--nproc-per-node", type=argtypes.int_range(1, 1024), default=1, metavar="N",
                   help="start N processes (torch.distributed.run); needs --parallel ddp or fsdp")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--threads", type=argtypes.positive_int,
                   help="torch threads (default: torch's; torchrun sets 1 per process)")


def run(args):
    import torch

    from pathlib import Path

    from ..core.outputs import check_output
    from ..train.loop import TrainConfig
    from ..train.pretrain import pretrain

    if args.resume and args.force:
        raise ValueError("--resume and --force: choose one (continue the run in --out, or replace it)")
    preset_file = args.preset if args.preset.endswith(".json") or Path(args.preset).is_file() else None
    check_output(args.out, force=args.force, resume=args.resume, inputs=[args.data, args.tokenizer, preset_file])
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        if args.parallel == "none":
            raise ValueError(f"--nproc-per-node {args.nproc_per_node}: choose --parallel ddp or fsdp")
        from ..train.launch import launch
        return launch(args.nproc_per_node, _without_nproc(getattr(args, "argv", None) or sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = argtypes.config_from_args(TrainConfig, args, out_dir=args.out, allow_changed=args.allow_changed_flags,
                                    overwrite=args.force)
    result = pretrain(args.data, args.tokenizer, args.preset, cfg, batch_size=args.batch_size, seq_len=args.seq_len,
                      parallel=args.parallel, eval_windows=args.eval_windows)
    if result is not None:
        print(json.dumps(result))


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out
