#!/usr/bin/env bash
# The prepared GPU check of issue 8, in one call (ends within GPU_CHECK_BUDGET seconds, default 330):
#   1. the environment: nvidia-smi -L, torch/CUDA/transformers versions, which optional packages exist;
#   2. the tests on CUDA: tests/inference/test_device.py with ANNOTATED_LLAMA_TEST_DEVICE=cuda (compiled decode
#      step with CUDA graphs included), then device-agnostic test files as a check of this image's
#      torch/transformers/peft versions (at most 150 s);
#   3. bench/gpu_7b.py: llama-7b-shaped random model built on the GPU; decode tok/s for bfloat16
#      eager, then bfloat16, int8, int4 compiled (a run that cannot finish in time goes eager or is
#      skipped; what finished is kept).
# Each part may fail; the others still run and everything is written to $OUT:
#   env.txt, pytest.log, junit.xml, bench.log, gpu_7b.json, summary.txt
#
#   PYTHONUNBUFFERED=1 bash bench/gpu_check.sh          # on the GPU machine, from the repo root
#   GPU_CHECK_SMALL=1 OUT=/tmp/gc bash bench/gpu_check.sh   # dry run on a CPU: tiny preset, no compile
# GPU_CHECK_PYTEST_ARGS replaces the test selection (tests/inference/test_device.py runs a dry run with one test).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-330}
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 GPU_CHECK_RUNNING=1
left() { echo $(( START + BUDGET - $(date +%s) )); }

if [ -n "${GPU_CHECK_SMALL:-}" ]; then
    DEVICE=cpu
    BENCH_ARGS=(--preset tiny --device cpu --no-compile --new-tokens 16 --reps 2)
else
    DEVICE=cuda
    BENCH_ARGS=(--preset llama-7b --device cuda)
fi
if [ -n "${GPU_CHECK_PYTEST_ARGS:-}" ]; then
    read -r -a TESTS <<< "$GPU_CHECK_PYTEST_ARGS"
else
    # test_device first: it is the point. The others run on the CPU whatever the device (their
    # imports exist on the GPU image).
    TESTS=(tests/inference/test_device.py tests/core/test_model.py tests/inference/test_engine.py tests/core/test_kv_cache.py
           tests/transforms/test_quantize.py tests/transforms/test_lora.py tests/core/test_sampling.py tests/inference/test_speculative.py
           tests/transforms/test_peft_interop.py)
fi

# ---- 1. environment ----
{
    echo "date: $(date -u)  device: $DEVICE  budget: ${BUDGET}s"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi -L 2>&1
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    else
        echo "nvidia-smi: not available"
    fi
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
          f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
for name in ("transformers", "peft", "sentencepiece", "safetensors", "tiktoken", "tqdm", "numpy", "pytest",
             "pytest_timeout", "triton", "gguf", "fastapi", "uvicorn", "openai", "httpx", "rouge_score"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:
        print(f"  {name}: missing ({type(e).__name__})")
import annotated_llama
print("annotated_llama imports:", annotated_llama.__version__)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- 2. tests on the device ----
T=$(( $(left) - 150 ))  # leave the benchmark at least 150 s
[ "$T" -gt 150 ] && T=150
EXTRA=()
"$PY" -c "import pytest_timeout" 2>/dev/null && EXTRA=(--timeout 100)  # one hung test must not eat the rest
if [ "$T" -ge 30 ]; then
    echo "== pytest on $DEVICE (at most ${T}s)"
    # SIGINT: pytest stops like on Ctrl-C and still prints its summary and writes junit.xml
    ANNOTATED_LLAMA_TEST_DEVICE=$DEVICE timeout -s INT -k 15 "$T" "$PY" -m pytest -v -rfE -p no:cacheprovider \
        ${EXTRA[@]+"${EXTRA[@]}"} --junitxml="$OUT/junit.xml" "${TESTS[@]}" > "$OUT/pytest.log" 2>&1
    PYTEST_RC=$?
    tail -n 40 "$OUT/pytest.log"
else
    PYTEST_RC=skipped
    echo "pytest skipped: only $(left)s left" > "$OUT/pytest.log"
fi
echo "pytest exit status: $PYTEST_RC"

# ---- 3. 7B-shaped decode benchmark ----
B=$(( $(left) - 10 ))
if [ "$B" -ge 30 ]; then
    echo "== bench/gpu_7b.py (at most ${B}s)"
    timeout -k 10 "$B" "$PY" bench/gpu_7b.py "${BENCH_ARGS[@]}" --time-limit $(( B - 20 )) \
        --out "$OUT/gpu_7b.json" > "$OUT/bench.log" 2>&1
    BENCH_RC=$?
    cat "$OUT/bench.log"
else
    BENCH_RC=skipped
    echo "benchmark skipped: only $(left)s left" > "$OUT/bench.log"
fi
echo "gpu_7b.py exit status: $BENCH_RC"

# ---- summary ----
{
    echo "gpu_check on $DEVICE, $(( $(date +%s) - START ))s"
    head -n 2 "$OUT/env.txt"
    grep -E '^(GPU |NVIDIA|nvidia-smi|python |gpu:)' "$OUT/env.txt"
    echo "pytest (exit $PYTEST_RC): $(grep -E '(passed|failed|error)' "$OUT/pytest.log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest.log" | head -n 20
    echo "gpu_7b.py (exit $BENCH_RC):"
    grep -E 'tok/s|FAILED|skipped|params on' "$OUT/bench.log" | head -n 12
} > "$OUT/summary.txt" 2>&1
echo "== summary"
cat "$OUT/summary.txt"
exit 0
