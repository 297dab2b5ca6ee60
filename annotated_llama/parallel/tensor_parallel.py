"""Tensor-parallel inference: one model split across N processes (`torchrun --nproc_per_node N`).

Megatron-LM's scheme (Shoeybi et al. 2019, section 3), which Meta's release used through
fairscale: every rank holds a slice of every matrix, and two all-reduces per layer glue the
slices back together.
  - attention: wq/wk/wv are split by output rows, whole heads per rank ("column-parallel": each
    rank computes its own heads, and caches only their keys/values); wo is split by input
    columns ("row-parallel"): each rank's heads give a partial sum of the output, all-reduced.
  - feed-forward: w1/w3 column-parallel, w2 row-parallel: SwiGLU is elementwise, so each rank
    applies it to its own hidden columns and one all-reduce sums the w2 partials.
  - output: column-parallel over the vocabulary, the logits all-gathered; the embedding is split
    like the checkpoint splits it (LLaMA 1/2 on the embedding dim, Llama 3 on the vocabulary).
`parallelize` does this to a finished `Transformer` from outside (model.py has no distributed
code). Rank 0 alone runs the front end (tokenizer, sampling, printing); the other ranks mirror
its forward calls (`lead` / `follow`), so the tokens are the ones rank 0 chose, with no second
sampler to drift.

The rest of tensor parallelism lives beside this file: tp_checkpoint.py reads only a rank's
slice of a checkpoint, and tp_launch.py starts the processes (torchrun) and stops them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelArgs
from ..core.kv_cache import CacheBatch, KVCache
from ..core.model import Transformer

# ---- the parallel layers ------------------------------------------------------------------


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns: this rank's partial sum, then all-reduced."""

    def __init__(self, weight: torch.Tensor, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (out, in/N)
        self.group = group

    def forward(self, x):  # x: (B, T, in/N), this rank's heads or hidden columns
        y = F.linear(x, self.weight)  # (B, T, out): a partial sum
        if dist.is_initialized():
            dist.all_reduce(y, group=self.group)  # one of the two all-reduces of a layer
        return y


class GatheredLinear(nn.Module):
    """The column-parallel output head: this rank's vocabulary slice, then all-gathered."""

    def __init__(self, weight: torch.Tensor, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V/N, C)
        self.group = group

    def forward(self, x):
        return _gather_last(F.linear(x, self.weight), self.group)  # (B, T, V/N) -> (B, T, V)


class ParallelEmbedding(nn.Module):
    """The embedding table split on `split_dim`: 1 = each rank holds C/N columns of every token
    (fairscale's ParallelEmbedding, LLaMA 1/2), 0 = each rank holds V/N tokens (Llama 3's
    VocabParallelEmbedding: rows outside the slice give zeros, and an all-reduce adds them)."""

    def __init__(self, weight: torch.Tensor, split_dim: int, rank: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # (V, C/N) or (V/N, C)
        self.split_dim, self.rank, self.group = split_dim, rank, group

    def forward(self, tokens):  # tokens: (B, T)
        if self.split_dim == 1:
            return _gather_last(F.embedding(tokens, self.weight), self.group)  # (B, T, C)
        lo = self.rank * self.weight.shape[0]
        local = tokens - lo
        outside = (local < 0) | (local >= self.weight.shape[0])  # (B, T)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)  # (B, T, C)
        h = h.masked_fill(outside[..., None], 0.0)
        if dist.is_initialized():
            dist.all_reduce(h, group=self.group)
        return h


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)  # rank order = slice order


# ---- parallelize a finished model ---------------------------------------------------------

def check_divisible(args: ModelArgs, world_size: int) -> None:
    """Each rank must hold whole heads, whole kv heads (it caches only its own), and equal slices."""
    if world_size < 1:
        raise ValueError(f"--tp must be a positive number of ranks, got {world_size}")
    for what, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads),
                    ("the FFN hidden dim", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
        if n > 0 and n % world_size:
            raise ValueError(f"--tp {world_size}: the model's {what} ({n}) is not divisible by {world_size}")


def _slice(w: torch.Tensor, dim: int, world_size: int, rank: int) -> torch.Tensor:
    size = w.shape[dim] // world_size
    return w.narrow(dim, rank * size, size).clone()  # clone: let the full matrix go


def parallelize(model: Transformer, world_size: int, rank: int, group=None, embedding_dim: int = 1) -> Transformer:
    """Keep rank `rank`'s slice of every matrix of `model` (in place) and add the collectives.

    Works on real weights (slices them) and on a model built on the meta device (then load the
    rank's state dict with `load_state_dict(sd, assign=True)`; see tp_checkpoint.py). For
    inference only: the collectives are not autograd-aware, so gradients are switched off.
    """
    check_divisible(model.params, world_size)
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        for lin in (att.wq, att.wk, att.wv, ffn.w1, ffn.w3):  # column-parallel: whole heads / columns
            lin.weight = nn.Parameter(_slice(lin.weight, 0, world_size, rank), requires_grad=False)
            lin.out_features = lin.weight.shape[0]
        att.wo = RowParallelLinear(_slice(att.wo.weight, 1, world_size, rank), group)  # (C, H/N*D)
        ffn.w2 = RowParallelLinear(_slice(ffn.w2.weight, 1, world_size, rank), group)  # (C, F/N)
        # Attention reads its head counts from these fields, and KVCache.for_model sizes a cache
        # for K/N kv heads: this rank's share. Query head h uses kv head h // (H/K); rank r's
        # query heads r*H/N.. map exactly onto its kv heads r*K/N.. because K divides by N.
        att.n_heads //= world_size
        att.n_kv_heads //= world_size
    # a tied head (Llama 3.2) is the embedding: its vocabulary slice, whatever the embedding's split
    model.output = GatheredLinear(_slice(model.output.weight, 0, world_size, rank), group)
    model.tok_embeddings = ParallelEmbedding(
        _slice(model.tok_embeddings.weight, embedding_dim, world_size, rank), embedding_dim, rank, group)
    model.requires_grad_(False)
    model.tp_world_size, model.tp_rank = world_size, rank
    return model


# ---- rank 0 leads, the others follow ------------------------------------------------------
# Rank 0 runs the ordinary front end (the engine, its sampler, the server) on its slice of the
# model. Every forward call goes through `model.step` (model.py: Meta's forward calls it too), so
# `lead` wraps that one method: it broadcasts the call's inputs, cache plan included, and the
# other ranks run the same call on their own caches (their heads' keys and values, in a KVCache
# with the same blocks), so the collectives inside line up. Sampling happens on rank 0 only.

_STOP, _STEP = 0, 1
HEADER = 12  # cmd, B, T, cache uid, capacity, block size, blocks read, span, fresh, has cache, logits_at, copies


def _src(group):
    return 0 if group is None else dist.get_global_rank(group, 0)


def lead(model: Transformer, group=None) -> None:
    """On rank 0: announce every `model.step` call to the ranks running `follow`."""
    device = model.norm.weight.device
    step = model.step

    def announced(tokens, positions, cache=None, logits_at=None):
        B, T = tokens.shape
        c = cache.cache if cache is not None else None
        header = [_STEP, B, T, c.uid if c else -1, c.capacity if c else 0, c.block_size if c else 0,
                  cache.block_table.shape[1] if c else 0, -1 if c is None or cache.span is None else cache.span,
                  int(bool(cache and cache.fresh)), int(c is not None), int(logits_at is not None),
                  0 if c is None or cache.copies is None else cache.copies.shape[0]]
        dist.broadcast(torch.tensor(header, device=device), _src(group), group=group)
        sent = [tokens, positions] + ([cache.slots, cache.block_table] if c else []) + \
            ([logits_at] if logits_at is not None else []) + ([cache.copies] if c and cache.copies is not None else [])
        for t in sent:
            dist.broadcast(t.to(device=device, dtype=torch.long).contiguous(), _src(group), group=group)
        return step(tokens, positions, cache, logits_at)

    model.step = announced  # an instance attribute: forward's `self.step` finds it too


def follow(model: Transformer, group=None) -> None:
    """On ranks > 0: run the calls rank 0 announces, until it sends stop."""
    device = model.norm.weight.device
    caches: dict[int, KVCache] = {}  # rank 0's cache uid -> this rank's mirror of it

    def receive(*shape):
        t = torch.empty(shape, dtype=torch.long, device=device)
        dist.broadcast(t, _src(group), group=group)
        return t

    with torch.inference_mode():
        while True:
            cmd, B, T, uid, capacity, block_size, nb, span, fresh, has_cache, has_logits_at, n_copies = \
                receive(HEADER).tolist()
            if cmd == _STOP:
                return
            tokens, positions = receive(B, T), receive(B, T)
            batch = None
            if has_cache:
                if uid not in caches:
                    caches[uid] = KVCache.for_model(model, max_tokens=1 << 40, block_size=block_size)
                cache = caches[uid]
                cache.ensure_capacity(capacity)
                slots, table = receive(B * T), receive(B, nb)
            logits_at = receive(B) if has_logits_at else None
            if has_cache:
                batch = CacheBatch(cache, slots, table, None if span < 0 else span, nb * block_size, bool(fresh),
                                   receive(n_copies, 2) if n_copies else None)
            try:
                model.step(tokens, positions, batch, logits_at)
            except (ValueError, RuntimeError):
                pass  # bad input: rank 0 raised the same error before any collective, and reports it


def stop_followers(model: Transformer, group=None) -> None:
    device = model.norm.weight.device
    dist.broadcast(torch.tensor([_STOP] + [0] * (HEADER - 1), device=device), _src(group), group=group)
