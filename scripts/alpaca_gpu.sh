#!/usr/bin/env bash
# The Alpaca gain on one GPU, in one call: a time-boxed sweep (scripts/alpaca_sweep.py), then the
# winning LoRA recipe end to end through the CLI (finetune --lora, eval-instruct before and after).
#
#   OUT=results/ DEVICE=cuda bash scripts/alpaca_gpu.sh
#
# Run from the repo root; works without installing the package (PYTHONPATH=.). Knobs (seconds):
# SWEEP_S for the whole sweep, FINAL_S for the final run's training; SWEEP_ARGS adds sweep options.
# Writes to $OUT: run.log, sweep.jsonl, best_args.txt, final_finetune.json, eval_before.json,
# eval_after.json and the final adapter under adapter/ (7 small files).
set -uo pipefail
OUT=${OUT:-/tmp/alpaca_out}
DEVICE=${DEVICE:-cuda}
SWEEP_S=${SWEEP_S:-140}
FINAL_S=${FINAL_S:-50}
SWEEP_ARGS=${SWEEP_ARGS:-}
FINAL_DIR=${FINAL_DIR:-$(mktemp -d)/final}
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/run.log"
MODEL=annotated_llama/default_model
HELDOUT=data/instruct/heldout.jsonl

{
  echo "== $(date -u +%H:%M:%S) device $DEVICE"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  # the sweep: killed after SWEEP_S + 40 s at worst; best_args.txt is rewritten after every result
  timeout $((SWEEP_S + 40)) python scripts/alpaca_sweep.py --device "$DEVICE" --budget-s "$SWEEP_S" \
      --final-s "$FINAL_S" --old-data regenerate --out "$OUT" $SWEEP_ARGS 2>&1 | grep -v '^step='
  if [ -s "$OUT/best_args.txt" ]; then ARGS=$(cat "$OUT/best_args.txt"); else
    ARGS="--lora --lora-targets all --lora-r 16 --lora-alpha 32 --lora-dropout 0.0 --lr 0.003 --batch-size 64 --max-steps 1000"
    echo "no sweep result: falling back to $ARGS"
  fi
  echo "== $(date -u +%H:%M:%S) final: finetune $ARGS"
  python -m annotated_llama finetune --model "$MODEL" --data data/instruct/train.jsonl --out "$FINAL_DIR" $ARGS \
      --device "$DEVICE" --log-every 250 >"$OUT/final_finetune.json"
  echo "== $(date -u +%H:%M:%S) eval before"
  python -m annotated_llama eval-instruct --model "$MODEL" --data "$HELDOUT" --device "$DEVICE" --batch-size 256 \
      --json >"$OUT/eval_before.json"
  cat "$OUT/eval_before.json"
  echo "== $(date -u +%H:%M:%S) eval after"
  python -m annotated_llama eval-instruct --model "$MODEL" --lora "$FINAL_DIR" --data "$HELDOUT" --device "$DEVICE" \
      --batch-size 256 --json >"$OUT/eval_after.json"
  cat "$OUT/eval_after.json"
  python -m annotated_llama eval-instruct --model "$MODEL" --lora "$FINAL_DIR" --data "$HELDOUT" --device "$DEVICE" \
      --batch-size 256 --show 12 | tail -n 12
  mkdir -p "$OUT/adapter"
  cp "$FINAL_DIR/adapter_config.json" "$FINAL_DIR/adapter_model.safetensors" "$OUT/adapter/" 2>/dev/null
  ls -la "$FINAL_DIR" "$FINAL_DIR"/ckpt-* 2>/dev/null
  echo "== $(date -u +%H:%M:%S) done"
} 2>&1 | tee "$LOG"
