"""`annotated-llama pretrain --data DIR --preset NAME|params.json --out DIR [--resume]`.

One process; several with `--nproc-per-node N` (started through torch.distributed.run, quietly:
a bad input is one line); or under `torchrun --nproc_per_node N -m annotated_llama pretrain ...
--parallel ddp|fsdp`, where torchrun adds its own failure summary to a rank's one line.
"""

import json
import os
import sys
from pathlib import Path

from . import argtypes, config_flags

CONFIG = "annotated_llama.train.loop:TrainConfig"  # its fields are the training flags (cli/config_flags.py)
# Fields the command sets itself: the run's identity (data, model, flags) and the model's FLOPs
# per token, both computed in train/pretrain.py.
EXCLUDE = ("run", "flops_per_token")
RENAME = {"out_dir": "--out", "allow_changed": "--allow-changed-flags", "overwrite": "--force"}
HELP = {"allow_changed": "with --resume: continue even if run-defining flags (--lr, --batch-size...) changed",
        "overwrite": "replace the run already in --out (its checkpoints go)"}
# 3e-4 is LLaMA 7B's peak; a model of a few million parameters trained from scratch takes a
# larger one (the default model's run: scripts/train_default_model.sh).
DEFAULTS = {"lr": 1e-3}


def add_arguments(p):
    p.add_argument("--data", required=True, help="token shard dir made by `annotated-llama pretokenize`")
    p.add_argument("--tokenizer", help="tokenizer.model (default: the one in --data)")
    p.add_argument("--preset", required=True, help="a ModelArgs preset name, or a params.json path")
    p.add_argument("--batch-size", type=config_flags.TRAINING_TYPES["batch_size"], default=16,
                   help="rows per process per micro-batch (default: %(default)s)")
    p.add_argument("--seq-len", type=argtypes.int_range(1, 1 << 22), default=256,
                   help="tokens per row (default: %(default)s)")
    p.add_argument("--eval-windows", type=argtypes.positive_int, default=32,
                   help="validation windows of --seq-len per evaluation (default: %(default)s)")
    p.add_argument("--parallel", default="none", choices=["none", "ddp", "fsdp"],
                   help="data parallelism across processes (default: %(default)s)")
    p.add_argument("--nproc-per-node", type=argtypes.int_range(1, 1024), default=1, metavar="N",
                   help="start N processes (torch.distributed.run); needs --parallel ddp or fsdp")
    p.add_argument("--threads", type=argtypes.positive_int,
                   help="torch threads (default: torch's; torchrun sets 1 per process)")
    group = p.add_argument_group("training (TrainConfig, annotated_llama/train/loop.py)")
    config_flags.add_config_flags(group, CONFIG, exclude=EXCLUDE, rename=RENAME, help=HELP, default=DEFAULTS)


def run(args):
    import torch

    from ..core.outputs import check_output
    from ..train.loop import TrainConfig
    from ..train.pretrain import pretrain

    if args.resume and args.overwrite:
        raise ValueError("--resume and --force: choose one (continue the run in --out, or replace it)")
    preset_file = args.preset if args.preset.endswith(".json") or Path(args.preset).is_file() else None
    check_output(args.out_dir, force=args.overwrite, resume=args.resume,
                 inputs=[args.data, args.tokenizer, preset_file])
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        if args.parallel == "none":
            raise ValueError(f"--nproc-per-node {args.nproc_per_node}: choose --parallel ddp or fsdp")
        from ..train.launch import launch
        return launch(args.nproc_per_node, _without_nproc(getattr(args, "argv", None) or sys.argv[1:]))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = argtypes.config_from_args(TrainConfig, args)
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
