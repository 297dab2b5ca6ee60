"""How the engine runs a forward call: the plain model, or its decode step compiled.

Both run the same `Transformer.step` (model.py) on the same weights and the same paged cache;
the compiled one only changes how the decode step (one new token per row) is executed:

  - A decode step reads every weight once per token and does two FLOPs with each: it is bound by
    memory bandwidth. Eager PyTorch spends its time elsewhere: ~25 small ops per layer, each a
    dispatch and a thread-pool fork/join, and `F.linear` reads one row's float32 and bfloat16
    weights at about half the machine's bandwidth (with a few rows in float32, a tenth).
  - So the compiled step's linears (`DecodeLinear`, in a second module tree over the same weights,
    `decode_view`) call the decode kernel of matvec.py, which streams each weight once for all the
    rows of the step, where it beats F.linear (bench/RESULTS.md); without the kernel, a float32
    row is written as multiply-and-sum, which inductor compiles to one streaming loop.
  - torch.compile fuses the rest (norms, rotations, attention over the cache, residuals) into a
    few loops, and its C++ wrapper calls them without Python in between.
  - Prefill (many tokens per row) stays eager: it is compute-bound, and its GEMMs are the ones a
    compiled graph would call.

"auto" builds the kernel and compiles on a background thread (warming up on a scratch cache) and
decodes eagerly until that is done, so the first token never waits for it; "compiled" does it
first (the first call waits: benchmarks and tests want that); "eager" never compiles. Dynamic
shapes: one graph serves every cache length and batch size, so a new request does not recompile.
"""

from __future__ import annotations

import copy
import logging
import shutil
import threading
import time
import types
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.kv_cache import CacheBatch, KVCache
from . import matvec

log = logging.getLogger("annotated_llama.backends")
BACKENDS = ("auto", "eager", "compiled")


class DecodeLinear(nn.Linear):
    """An nn.Linear for the compiled decode step: a product with few rows goes to the decode kernel
    where measurement favours it, else to F.linear (prefill-sized products always). Only the
    compiled step's view of the model (`decode_view`) has these; eager calls keep nn.Linear."""
    kernel = False  # set by decode_view: the kernel of matvec.py is loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, dtype = x.shape[:-1].numel(), self.weight.dtype
        if self.kernel and _kernel_wins(dtype, rows):
            return matvec.matvec(x.reshape(rows, -1), self.weight).view(*x.shape[:-1], -1)  # (..., N)
        if not self.kernel and rows == 1 and dtype == torch.float32:
            # multiply-and-sum: inductor compiles it to one loop that streams the weight
            y = (self.weight * x.reshape(1, -1)).sum(-1)  # (N,)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def _kernel_wins(dtype, rows: int) -> bool:
    # Where the decode kernel beat F.linear on this project's CPU (bench/bench_matvec.py): float32 at
    # every decode size; bfloat16 for one or two rows (from 4 rows oneDNN's GEMM is as fast);
    # float16 from 2 rows (F.linear has a fast float16 matrix-vector product, but no fast GEMM)
    if rows > matvec.MAX_ROWS:
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and rows <= 2) or (dtype == torch.float16 and rows >= 2)


def decode_view(module: nn.Module, kernel: bool) -> nn.Module:
    """A second module tree over the same parameters and buffers (nothing is copied), with every
    plain nn.Linear a DecodeLinear: what the compiled step runs, while eager calls keep the
    original modules (so a compile on another thread never changes what they compute)."""
    view = copy.copy(module)  # shares the parameter and buffer tensors
    view._modules = {name: decode_view(child, kernel) for name, child in module._modules.items()}
    if type(module) is nn.Linear and module.bias is None:
        view.__class__ = DecodeLinear
        view.kernel = kernel
    return view


class CompiledRunner:
    """`runner(tokens, positions, cache_batch, logits_at)` for the engine: decode steps through
    one compiled graph once it is built, everything else (and everything before) eagerly."""

    def __init__(self, model, *, background: bool = True, max_batch_size: int = 8):
        self.model, self.max_batch_size = model, max_batch_size
        self.view: Optional[nn.Module] = None  # built with the kernel, on the warm-up thread
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self.calls = {"compiled": 0, "eager": 0}
        # dynamo keeps its graphs, and its limit of 8 recompiles, on the code object: a copy per
        # runner, so that the models of one process (tests, benchmarks) never share or exhaust them
        fn = type(self)._decode
        fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        self.compiled = torch.compile(types.MethodType(fn, self), dynamic=True, fullgraph=True,
                                      **_compile_options(model))
        if background:
            # not a daemon: one killed at interpreter exit inside a torch call aborts the process
            # ("terminate called without an active exception"); this one stops between its steps
            # once the main thread has finished, and the exit waits at most for the current step
            self.thread = threading.Thread(target=self._warm_up, name="annotated-llama-compile")
            self.thread.start()
        else:
            self._warm_up()

    def _decode(self, tokens, positions, slots, block_table, pools_k, pools_v, logits_at):
        # the engine's CacheBatch, rebuilt from tensors: its ints would otherwise be constants of the graph
        cache = _Pools(pools_k, pools_v)
        batch = CacheBatch(cache, slots, block_table, None, block_table.shape[1] * pools_k[0].shape[1], False)
        return self.view.step(tokens, positions, batch, logits_at)

    def __call__(self, tokens, positions, batch: Optional[CacheBatch] = None, logits_at=None):
        if tokens.shape[1] == 1 and batch is not None and not batch.fresh and batch.copies is None \
                and logits_at is not None \
                and self.ready.is_set() and self.error is None:
            c, table = batch.cache, batch.block_table
            if table.shape[1] < 2:  # dynamo specialises sizes 0 and 1: keep one graph for every length
                table = torch.cat([table, torch.zeros_like(table)], 1)  # (B, 2): block 0, keys masked
            try:
                out = self.compiled(tokens, positions, batch.slots, table, c.k, c.v, logits_at)
                self.calls["compiled"] += 1
                return out
            except Exception as e:  # a graph that cannot be built for this call: eager from now on
                self.error = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("the compiled decode step failed, decoding eagerly: %s", self.error)
        self.calls["eager"] += 1
        return self.model.step(tokens, positions, batch, logits_at)

    def _warm_up(self):
        """Build the kernel, then compile on a scratch cache, so that no later step recompiles."""
        try:
            dev = self.model.tok_embeddings.weight.device
            kernel = dev.type == "cpu" and matvec.load()
            t0 = time.perf_counter()
            self.view = decode_view(self.model, kernel)
            # one graph per branch of DecodeLinear: 1 row, 2, 3 to 16 (MAX_ROWS), and more
            sizes = [1, 2, 3] + ([matvec.MAX_ROWS + 1] if self.max_batch_size > matvec.MAX_ROWS else [])
            with torch.inference_mode():
                scratch = KVCache.for_model(self.model, max_tokens=max(sizes) * 64, block_size=16)
                for B in sizes:
                    if not threading.main_thread().is_alive():
                        self.error = "stopped: the program ended before the compile"
                        return
                    ids, start = [("warm", B, b) for b in range(B)], 20
                    scratch.plan(ids, [0] * B, [start] * B, start)  # positions before `start` "held"
                    batch = scratch.plan(ids, [start] * B, [1] * B, 1)
                    table = batch.block_table
                    torch._dynamo.mark_dynamic(table, 1)  # else a batch of 1 specialises its length
                    zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
                    self.compiled(zeros, zeros + start, batch.slots, table, scratch.k, scratch.v,
                                  torch.zeros(B, dtype=torch.long, device=dev))
                    scratch.reset()
            log.info("compiled decode step ready after %.0f s", time.perf_counter() - t0)
            self.ready.set()
        except Exception as e:  # no compiler here (e.g. no C++ toolchain): stay eager, say why once
            self.error = f"{type(e).__name__}: {e}".splitlines()[0]
            if threading.main_thread().is_alive():  # (at exit, inductor's workers are already gone)
                log.warning("torch.compile failed, decoding eagerly: %s", self.error)


class _Pools:
    # the part of a KVCache that CacheBatch.update reads, as graph inputs
    def __init__(self, k, v):
        self.k, self.v = k, v


def _compile_options(model) -> dict:
    if model.tok_embeddings.weight.device.type == "cuda":
        return {}
    # store every intermediate vector: inductor would otherwise inline each RMSNorm (and the
    # residual adds) into the matrix-vector loops, redone per weight row (~25% slower here)
    # cpp_wrapper: the graph's calls in C++, not a Python wrapper (~1 ms a step on a tiny model)
    return {"options": {"realize_opcount_threshold": 1, "realize_acc_reads_threshold": 1, "cpp_wrapper": True}}


def compile_available() -> bool:
    """Whether "auto" may compile: inductor needs a C++ compiler on the CPU (Triton on a GPU)."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def runner_state(runner) -> dict:
    """What /health and the stats say of a runner: "eager", "compiling" (decoding eagerly until the
    compiled step is ready), "compiled", or "eager" with the reason the compile failed."""
    if not isinstance(runner, CompiledRunner):
        return {"decode": "eager", "compile_error": None}
    if runner.error is not None:
        return {"decode": "eager", "compile_error": runner.error}
    return {"decode": "compiled" if runner.ready.is_set() else "compiling", "compile_error": None}


def make_runner(model, backend: str = "auto", max_batch_size: int = 8):
    """The engine's forward call for `backend`: "eager" (model.step), "compiled", or "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if getattr(model, "tp_world_size", 1) > 1:
        return model.step  # tensor parallelism: rank 0's step broadcasts (tensor_parallel.lead), eagerly
    if backend == "eager" or (backend == "auto" and not compile_available()):
        return model.step
    return CompiledRunner(model, background=backend == "auto", max_batch_size=max_batch_size)


__all__ = ["make_runner", "runner_state", "CompiledRunner", "DecodeLinear", "decode_view", "BACKENDS", "compile_available"]
