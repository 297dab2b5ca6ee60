"""`annotated-llama finetune --model PATH --data FILE.json|jsonl --out DIR [--lora]`: Alpaca fine-tuning.

With --lora, DIR becomes a PEFT-format adapter (adapter_config.json + adapter_model.safetensors);
without, a full checkpoint in our dir format. Both runs write DIR/log.jsonl through the shared loop.
"""

import json

from . import argtypes, config_flags

CONFIG = "annotated_llama.train.finetune:FinetuneConfig"
RENAME = {"allow_changed": "--allow-changed-flags"}
HELP = {"allow_changed": "with --resume: continue even if run-defining flags (--lr, --batch-size...) changed"}
CHOICES = {"template": ["alpaca"]}


def add_arguments(p):
    # every flag is a FinetuneConfig field (train/finetune.py): its comment is the help text
    config_flags.add_config_flags(p, CONFIG, rename=RENAME, help=HELP, choices=CHOICES)


def run(args):
    from ..train.finetune import FinetuneConfig, finetune
    from ..transforms.lora import parse_targets

    if args.lora:
        parse_targets(args.lora_targets)  # a bad --lora-targets fails before anything loads
    if args.resume and args.force:
        raise ValueError("--resume and --force: choose one (continue the run in --out, or replace it)")
    cfg = argtypes.config_from_args(FinetuneConfig, args)
    result = finetune(cfg)
    print(json.dumps(result))
