"""Decoding's matrix products, y = x @ w^T with a few rows of x, as one small C++ kernel.

A decode step multiplies one row per request by every weight matrix: it reads all the weights
and does two FLOPs with each, so it is bound by memory bandwidth. PyTorch's CPU GEMMs are built
for the other case. Measured on this project's 2-core CPU (bench/RESULTS.md), `F.linear` with one
row reads float32 and bfloat16 weights at well under the machine's bandwidth, and with 8 rows in
float32 it takes a slow path at a tenth of it; each call also costs tens of microseconds of fixed
overhead, which dominates a small model. `matvec.cpp` does what llama.cpp's kernels do: each
thread streams its share of the weight rows once, in the dtype they are stored in (no repacking,
no second copy), converts them to float32 in registers (AVX-512: bfloat16 is the top half of a
float32, float16 goes through F16C) and forms every row of x's dot products while the weight row
is in L1. So a batch of 8 reads the weights once, as a batch of 1 does.

It is compiled at first use with torch.utils.cpp_extension (ninja, g++ -O3 -march=native; tens of
seconds once, cached under ~/.cache/torch_extensions in one directory per source and environment)
and registered as the operator `torch.ops.annotated_llama.matvec`, with a shape-only implementation so that torch.compile can
place it in a graph. `load()` says whether this CPU and toolchain could build it; where they
cannot, callers keep `F.linear`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger("annotated_llama.matvec")
SOURCE = Path(__file__).with_name("matvec.cpp")
MAX_ROWS = 16  # more rows than this are a prefill: a GEMM's job
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

FLAGS = ["-O3", "-march=native", "-fopenmp"]
BUILD_NAME = "annotated_llama_matvec"
STALE_LOCK_S = 600  # a build takes a minute or two; a lock older than this was left by a killed one

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}


def cpu_supports() -> bool:
    """AVX-512 (with F16C, which every AVX-512 CPU has): what the kernel is written for."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f " in flags and " f16c " in flags


def load() -> bool:
    """Build (first time) and load the kernel; False, with the reason logged once, where it cannot."""
    with _lock:
        if _state["loaded"] or _state["error"]:
            return _state["loaded"]
        if not cpu_supports():
            _state["error"] = "this CPU has no AVX-512"
            return False
        try:
            from torch.utils.cpp_extension import load as build  # here: ~0.3 s to import, needed only to build/load
            build(BUILD_NAME, [str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False,
                  verbose=False, build_directory=str(_build_dir()))
            torch.library.register_fake("annotated_llama::matvec")(_shape_only)
            _state["loaded"] = True
        except Exception as e:  # no compiler, no ninja: the callers keep F.linear
            _state["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("the decode kernel could not be built (%s); using F.linear", _state["error"])
        return _state["loaded"]


def _build_dir() -> Path:
    # One directory per source, flags, torch and environment: two virtual environments sharing a
    # home directory would otherwise rebuild over each other's build (their include paths differ).
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, torch.__version__, sys.prefix]).encode()).hexdigest()
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    path = root / f"{BUILD_NAME}-{key[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    lock = path / "lock"  # torch's build waits forever for a lock file a killed build left behind
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink()
    except FileNotFoundError:
        pass
    return path


def loaded() -> bool:
    return _state["loaded"]


def _shape_only(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def matvec(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ w (N, K)^T -> (M, N) in x's dtype, for M <= MAX_ROWS, on the CPU."""
    return torch.ops.annotated_llama.matvec(x, w)


__all__ = ["load", "loaded", "matvec", "cpu_supports", "MAX_ROWS", "DTYPES"]
