"""How the engine runs a forward call: the plain model, or the model through torch.compile.

Both run the same `Transformer.step` (model.py) on the same weights and the same paged cache;
the compiled one only changes how the decode step (one new token per row) is executed:

  - Batch-1 decoding reads every weight once per token and does two FLOPs with each: it is bound
    by memory bandwidth. Eager PyTorch spends its time elsewhere: ~25 small ops per layer, each a
    dispatch and a thread-pool fork/join, and `F.linear` with one row reads float32 and bfloat16
    weights at about half the machine's bandwidth. torch.compile turns the step into a few fused
    loops; and the one-row products are written as multiply-and-sum (`StreamingLinear`), which
    inductor compiles to one loop streaming the weight once (docs/annotated/10_speed.md).
  - Steps with more rows keep `F.linear` (a matrix product), inside the same compiled program.
  - Prefill (many tokens per row) stays eager: it is compute-bound, and the eager kernels are
    the same ones a compiled graph would call.

The first token never waits for a cold compile: `CompiledRunner` compiles on a background
thread (warming it up on a scratch cache) and runs eagerly until the compiled step is ready.
One graph serves every batch size and cache length (dynamic shapes), so a new shape does not
recompile. "auto" compiles on a background thread (the first tokens come eagerly); "compiled" compiles first
(the first call waits; benchmarks and tests want that); "eager" never compiles.
"""

from __future__ import annotations

import copy
import logging
import threading
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import CacheBatch, KVCache

log = logging.getLogger("annotated_llama.backends")
BACKENDS = ("auto", "eager", "compiled")


class StreamingLinear(nn.Linear):
    """An nn.Linear whose one-row product is written as multiply-and-sum: inside torch.compile,
    inductor turns it into a loop that reads each weight once, converts it to float32 in registers
    and accumulates (a bandwidth-bound matrix-vector product). With more rows it is F.linear. Only
    the compiled step's view of the model (`streaming_view`) has these: eagerly, the product would
    be materialised."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() == 1:
            y = (self.weight.float() * x.reshape(1, -1).float()).sum(-1)  # (N,)
            return y.to(x.dtype).view(*x.shape[:-1], -1)  # (..., N)
        return F.linear(x, self.weight, self.bias)


def streaming_view(module: nn.Module) -> nn.Module:
    """A second module tree over the same parameters and buffers (nothing is copied), with every
    plain nn.Linear a StreamingLinear: what the compiled step runs, while eager calls keep the
    original modules (so a compile on another thread never changes what they compute)."""
    view = copy.copy(module)  # shares the parameter and buffer tensors
    view._modules = {name: streaming_view(child) for name, child in module._modules.items()}
    if type(module) is nn.Linear:
        view.__class__ = StreamingLinear
    return view


class CompiledRunner:
    """`runner(tokens, positions, cache_batch, logits_at)` for the engine: decode steps through
    one compiled graph once it is built, everything else (and everything before) eagerly."""

    def __init__(self, model, *, background: bool = True):
        self.model = model
        self.streaming = streaming_view(model)
        self.ready = threading.Event()
        self.error: Optional[str] = None
        self.calls = {"compiled": 0, "eager": 0}
        self.compiled = torch.compile(self._decode, dynamic=True, fullgraph=True, **_compile_options(model))
        if background:
            threading.Thread(target=self._warm_up, name="annotated-llama-compile", daemon=True).start()
        else:
            self._warm_up()

    def _decode(self, tokens, positions, slots, block_table, pools_k, pools_v, logits_at):
        # the engine's CacheBatch, rebuilt from tensors: its ints would otherwise be constants of the graph
        cache = _Pools(pools_k, pools_v)
        batch = CacheBatch(cache, slots, block_table, None, block_table.shape[1] * pools_k[0].shape[1], False)
        return self.streaming.step(tokens, positions, batch, logits_at)

    def __call__(self, tokens, positions, batch: Optional[CacheBatch] = None, logits_at=None):
        if tokens.shape[1] == 1 and batch is not None and not batch.fresh and batch.copies is None \
                and logits_at is not None \
                and self.ready.is_set() and self.error is None:
            self.calls["compiled"] += 1
            c = batch.cache
            return self.compiled(tokens, positions, batch.slots, batch.block_table, c.k, c.v, logits_at)
        self.calls["eager"] += 1
        return self.model.step(tokens, positions, batch, logits_at)

    def _warm_up(self):
        """Compile on a scratch cache: batch 1 and 2, two cache lengths (so every size is dynamic)."""
        try:
            with torch.inference_mode():
                dev = self.model.tok_embeddings.weight.device
                scratch = KVCache.for_model(self.model, max_tokens=4 * 64, block_size=16)
                for B, start in ((1, 17), (2, 33), (2, 50)):
                    ids = [("warm", B, start, b) for b in range(B)]
                    scratch.plan(ids, [0] * B, [start] * B, start)  # positions before `start` "held"
                    batch = scratch.plan(ids, [start] * B, [1] * B, 1)
                    zeros = torch.zeros(B, 1, dtype=torch.long, device=dev)
                    self.compiled(zeros, zeros + start, batch.slots, batch.block_table, scratch.k, scratch.v,
                                  torch.zeros(B, dtype=torch.long, device=dev))
                    scratch.reset()
            self.ready.set()
        except Exception as e:  # no compiler here (e.g. no C++ toolchain): stay eager, say why once
            self.error = f"{type(e).__name__}: {e}".splitlines()[0]
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
    from shutil import which
    return any(which(c) for c in ("g++", "c++", "clang++"))


def make_runner(model, backend: str = "auto", max_batch_size: int = 8):
    """The engine's forward call for `backend`: "eager" (model.step), "compiled", or "auto"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if getattr(model, "tp_world_size", 1) > 1:
        return model.step  # tensor parallelism: rank 0's step broadcasts (tensor_parallel.lead), eagerly
    if backend == "eager" or (backend == "auto" and not compile_available()):
        return model.step
    return CompiledRunner(model, background=backend == "auto")


__all__ = ["make_runner", "CompiledRunner", "StreamingLinear", "streaming_view", "BACKENDS", "compile_available"]
