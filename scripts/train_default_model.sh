#!/usr/bin/env bash
# Reproduces the embedded default model (annotated_llama/default_model) from the repo's copy of
# the World English Bible (public domain): tokenizer, token shards, pretraining, export.
# About 70 minutes on 2 CPU cores (measured on a shared machine). Run from the repository root:
#   scripts/train_default_model.sh [RUN_DIR]        (default RUN_DIR: runs/default)
# Re-running with the same RUN_DIR resumes the pretraining from its newest checkpoint.
set -euo pipefail
RUN=${1:-runs/default}
CORPUS=data/world-english-bible.txt.xz
mkdir -p "$RUN"

[ -f "$RUN/tokenizer/tokenizer.model" ] || \
  annotated-llama train-tokenizer "$CORPUS" --vocab-size 4096 --out "$RUN/tokenizer"
[ -f "$RUN/data/meta.json" ] || \
  annotated-llama pretokenize "$CORPUS" --tokenizer "$RUN/tokenizer/tokenizer.model" --out "$RUN/data" --val-every 40

annotated-llama pretrain --data "$RUN/data" --preset bible-7m --out "$RUN/train" --resume \
  --max-steps 3600 --batch-size 8 --seq-len 256 --lr 1e-3 --warmup-steps 100 --min-lr-ratio 0.1 \
  --weight-decay 0.1 --grad-clip 1.0 --dtype bfloat16 --threads 2 --seed 1337 \
  --log-every 10 --eval-every 200 --eval-windows 32 --ckpt-every 100 --keep-checkpoints 2

# Export the final checkpoint as the package's default model (bf16 weights, Meta key names).
annotated-llama export "$RUN/train" annotated_llama/default_model --data "$RUN/data" --force
