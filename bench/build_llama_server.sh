#!/usr/bin/env bash
# Build llama.cpp's own `llama-server` (plus `llama-quantize` and `llama-bench`) from the llama.cpp
# source that the llama-cpp-python sdist vendors, so the server we compare against is the same
# llama.cpp as the bench extra's Python bindings (pyproject.toml pins the version).
#
#   bash bench/build_llama_server.sh DEST          # e.g. /work/llamacpp-build; ~10 min on 2 cores
#   LLAMA_SRC=DIR  where the sdist is downloaded and unpacked (default DEST/src)
#   JOBS=N         parallel compile jobs (default 2)
#   TARGETS="..."  cmake targets (default "llama-server llama-quantize llama-bench")
#
# Nothing is written inside this repository. Prints the binary's path on the last line; pass it
# to bench/bench_serving.py as --llama-server PATH or LLAMA_SERVER=PATH.
set -euo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bash bench/build_llama_server.sh DEST   (the build directory, outside the repository)" >&2
    exit 2
fi
DEST=$(realpath -m "$1")
SRC=$(realpath -m "${LLAMA_SRC:-$DEST/src}")
JOBS=${JOBS:-2}
TARGETS=${TARGETS:-"llama-server llama-quantize llama-bench"}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}  # the bench extra's pin (pyproject.toml)
PYTHON=${PYTHON:-python3}

SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    mkdir -p "$SRC"
    "$PYTHON" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
fi
if [ ! -d "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
    tar -xzf "$SDIST" -C "$SRC"
fi
LLAMA_CPP="$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"

start=$(date +%s)
# CURL and the web UI off: the benchmark talks to the server over localhost HTTP only, and the
# build must not fetch anything. GGML_NATIVE: -march=native, as llama-cpp-python builds here.
cmake -S "$LLAMA_CPP" -B "$DEST" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
for target in $TARGETS; do
    cmake --build "$DEST" -j "$JOBS" --target "$target"
done
echo "built in $(( $(date +%s) - start )) s (llama.cpp from llama-cpp-python $VERSION)"
ls -l "$DEST/bin/"
echo "$DEST/bin/llama-server"
