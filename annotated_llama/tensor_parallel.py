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
code). `load_rank_state_dict` reads only a rank's slice of Meta's `consolidated.NN.pth` shards
(any shard count whose slices line up with the ranks') or of safetensors. Rank 0 alone runs
the front end (tokenizer, sampling, printing); the other ranks mirror its forward calls
(`follow`), so the tokens are the ones rank 0 chose, with no second sampler to drift.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .model import Transformer

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
    rank's state dict with `load_state_dict(sd, assign=True)`; see `build_rank_model`). For
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
        # Attention reads its head counts from these fields, so the KV cache it allocates is
        # (B, S_max, K/N, D): this rank's share. Query head h uses kv head h // (H/K); rank r's
        # query heads r*H/N.. map exactly onto its kv heads r*K/N.. because K divides by N.
        att.n_heads //= world_size
        att.n_kv_heads //= world_size
        att.cache_k = att.cache_v = None
    model.output = GatheredLinear(_slice(model.output.weight, 0, world_size, rank), group)
    model.tok_embeddings = ParallelEmbedding(
        _slice(model.tok_embeddings.weight, embedding_dim, world_size, rank), embedding_dim, rank, group)
    model.requires_grad_(False)
    model.tp_world_size, model.tp_rank = world_size, rank
    return model


# ---- reading a rank's slice of a checkpoint -----------------------------------------------

# Meta's model-parallel layout (REFERENCE b4; HF convert_llama_weights_to_hf.py): the dim each
# tensor is split on across consolidated.NN.pth; None = replicated in every shard.
SPLIT_DIM = {
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "feed_forward.w1": 0,
    "feed_forward.w3": 0, "output": 0, "attention.wo": 1, "feed_forward.w2": 1,
}


def split_dim(name: str, embedding_dim: int) -> int | None:
    if name == "tok_embeddings.weight":
        return embedding_dim
    return SPLIT_DIM.get(re.sub(r"^layers\.\d+\.|\.weight$", "", name))


def _drop_pages(t: torch.Tensor) -> None:
    # torch.load(mmap=True) maps the file copy-on-write: pages we read stay in our resident set
    # until unmapped, so reading a column slice of every matrix would end with the whole file
    # resident. Once the slice is copied out, tell the kernel those (unmodified) pages may go;
    # a later read would fault them in again from the file. Linux only; elsewhere a no-op.
    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    end = t.data_ptr() + t.numel() * t.element_size()
    ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED


SHARD_FILE = re.compile(r"consolidated\.(\d+)\.pth$")


def inspect_checkpoint(path) -> tuple[ModelArgs, str, int]:
    """(ModelArgs, kind, number of shards) of a checkpoint dir; kind is meta, safetensors or hf."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tensor parallelism needs a checkpoint directory "
                                "(params.json + consolidated.NN.pth or model.safetensors, or an HF config.json dir)")
    if (path / "config.json").is_file() and not (path / "params.json").is_file():
        return ModelArgs.from_hf_config(json.loads((path / "config.json").read_text())), "hf", 1
    args = ModelArgs.from_params_json(path / "params.json")
    found = sorted(p for p in path.glob("consolidated.*.pth") if SHARD_FILE.search(p.name))
    if not found:
        if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
            return args, "safetensors", 1
        raise FileNotFoundError(f"{path}: no consolidated.NN.pth or model.safetensors")
    # Meta's params.json records neither the shard count nor (vocab_size -1) the vocabulary: read
    # both off the shapes in any one shard. mmap: only the pickled header is read, no tensor data.
    try:
        shard = torch.load(found[0], map_location="cpu", weights_only=True, mmap=True)
        rows, head_rows = shard["layers.0.attention.wq.weight"].shape[0], shard["output.weight"].shape[0]
    except (RuntimeError, KeyError, EOFError, ValueError) as e:
        raise ValueError(f"{found[0]}: not a readable Meta shard ({str(e).splitlines()[0][:120]})") from None
    if (args.n_heads * args.head_dim) % rows:
        raise ValueError(f"{found[0]}: wq has {rows} rows, which does not divide the model's {args.n_heads * args.head_dim}")
    n_shards = args.n_heads * args.head_dim // rows
    if args.vocab_size < 1:
        args.vocab_size = head_rows * n_shards
    return args, "meta", n_shards


def _full_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only, no memory
        return {k: v.shape for k, v in Transformer(args).state_dict().items()}


def shards_for_rank(n_shards: int, world_size: int, rank: int) -> range:
    """The shards rank `rank` reads. Its slice of a split tensor is [r/N, (r+1)/N) of it, and shard
    s holds [s/S, (s+1)/S): 8 shards on 2 ranks = 4 whole shards each, 1 shard on 4 ranks = a
    quarter of shard 0 each; any S and N work when the heads divide by both."""
    return range(rank * n_shards // world_size, ((rank + 1) * n_shards - 1) // world_size + 1)


def _read_meta(path: Path, args: ModelArgs, S: int, N: int, rank: int, convert):
    paths = [path / f"consolidated.{s:02d}.pth" for s in range(S)]
    mine = shards_for_rank(S, N, rank)
    first = mine[0]
    shards = {}
    for s in mine:
        if not paths[s].is_file():
            raise FileNotFoundError(f"{paths[s]}: no such file (rank {rank} of {N} needs it; the checkpoint has {S} shards)")
        shards[s] = torch.load(paths[s], map_location="cpu", weights_only=True, mmap=True)
    emb = shards[first]["tok_embeddings.weight"]
    # (V, C/S) for LLaMA 1/2's ParallelEmbedding, (V/S, C) for Llama 3's VocabParallelEmbedding
    embedding_dim = 0 if S > 1 and emb.shape[0] * S == args.vocab_size else 1
    sd = {}
    for name, full in _full_shapes(args).items():
        d = split_dim(name, embedding_dim)
        lo, hi = (0, 1) if d is None else (rank * full[d] // N, (rank + 1) * full[d] // N)
        q = 1 if d is None else full[d] // S  # rows (or columns) per shard
        sources, pieces = [], []
        for s in ([first] if d is None else range(lo // q, (hi - 1) // q + 1)):
            if name not in shards[s]:
                raise KeyError(f"{paths[s]}: tensor {name} is missing")
            t = shards[s][name]
            want = full if d is None else full[:d] + (q,) + full[d + 1:]
            if t.shape != want:
                raise ValueError(f"{paths[s]}: {name} has shape {tuple(t.shape)}, expected {tuple(want)} "
                                 f"for a {S}-shard checkpoint")
            sources.append(t)
            a, b = max(lo, s * q) - s * q, min(hi, (s + 1) * q) - s * q
            pieces.append(t if d is None else t.narrow(d, a, b - a))
        sd[name] = convert(torch.cat(pieces, d) if len(pieces) > 1 else pieces[0], copy=len(pieces) == 1)
        for t in sources:
            _drop_pages(t)
    return sd, embedding_dim


def _read_safetensors(path: Path, args: ModelArgs, N: int, rank: int, convert, hf: bool):
    from safetensors import safe_open

    from .weights.hf import META_TO_HF, permute_to_meta, rename

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    sd = {}
    for name, full in _full_shapes(args).items():
        stored = rename(name, META_TO_HF) if hf else name
        if stored not in weight_map:
            raise KeyError(f"{path}: tensor {stored} is missing")
        d = split_dim(name, 1)
        # One open per tensor: get_slice reads through a memory map that closing releases,
        # so at most one tensor's pages are resident beyond the slices we keep.
        with safe_open(str(path / weight_map[stored]), framework="pt") as f:
            sl = f.get_slice(stored)
            if tuple(sl.get_shape()) != tuple(full):
                raise ValueError(f"{path / weight_map[stored]}: {stored} has shape {tuple(sl.get_shape())}, "
                                 f"expected {tuple(full)}")
            if d is None:
                t = sl[:]
            else:
                size = full[d] // N
                t = sl[rank * size:(rank + 1) * size] if d == 0 else sl[:, rank * size:(rank + 1) * size]
        if hf and name.endswith(("wq.weight", "wk.weight")):
            # HF permuted q/k rows within each head (weights/hf.py); whole heads came, so undo it per head
            heads = args.n_heads if name.endswith("wq.weight") else args.n_kv_heads
            t = permute_to_meta(t, heads // N)
        sd[name] = convert(t, copy=False)
    return sd, 1


def load_rank_state_dict(path, world_size: int, rank: int, dtype=None, device="cpu"):
    """(args, state dict of rank `rank`'s slices, embedding split dim), reading only that slice.

    Peak memory is about 1/world_size of the model plus one tensor: Meta shards are memory-mapped
    (torch.load mmap=True) and safetensors read with get_slice, one tensor at a time.
    """
    path = Path(path)
    args, kind, n_shards = inspect_checkpoint(path)
    check_divisible(args, world_size)

    def convert(t, copy):
        return t.to(device=device, dtype=dtype or t.dtype, copy=copy)

    if kind == "meta":
        sd, embedding_dim = _read_meta(path, args, n_shards, world_size, rank, convert)
    else:
        sd, embedding_dim = _read_safetensors(path, args, world_size, rank, convert, hf=kind == "hf")
    return args, sd, embedding_dim


def build_rank_model(path, world_size: int, rank: int, group=None, dtype=None, device="cpu") -> Transformer:
    """This rank's slice of the model in `path`, ready for forward calls on every rank together."""
    args, sd, embedding_dim = load_rank_state_dict(path, world_size, rank, dtype, device)
    with torch.device("meta"):  # no memory for the full model, ever
        model = Transformer(args)
    parallelize(model, world_size, rank, group, embedding_dim)
    model.load_state_dict(sd, assign=True)
    model.reset_rope()
    return model.requires_grad_(False).eval()


# ---- rank 0 leads, the others follow ------------------------------------------------------
# Rank 0 runs the ordinary front end (generation loop, sampler, server) on its slice of the
# model. A forward pre-hook broadcasts each call's inputs, and the other ranks run the same
# call, so the collectives inside line up. Sampling happens on rank 0 only: nothing to agree on.

_STOP, _FORWARD, _SWAP = 0, 1, 2


def _src(group):
    return 0 if group is None else dist.get_global_rank(group, 0)


def lead(model: Transformer, group=None):
    """On rank 0: announce every forward call of `model` to the ranks running `follow`."""
    device = model.norm.weight.device
    seen = {"cache": None}  # rank 0's layer-0 cache after its last forward

    def announce(module, args, kwargs):
        current = model.layers[0].attention.cache_k
        if current is not None and current is not seen["cache"]:
            # e.g. generation.compact_cache: surgery the other ranks cannot see; refuse rather
            # than let their caches silently diverge (in-place row copies are not detected)
            raise RuntimeError("the KV cache was changed outside a forward call; under tensor parallelism "
                               "only forward calls and clear_cache() are mirrored to the other ranks")
        tokens = args[0] if args else kwargs["tokens"]
        start_pos = args[1] if len(args) > 1 else kwargs.get("start_pos", 0)
        pad_left, cache = kwargs.get("pad_left"), kwargs.get("cache", True)
        per_row = isinstance(start_pos, torch.Tensor)
        has_cache = model.layers[0].attention.cache_k is not None  # mirrors rank 0's clear_cache()
        header = [_FORWARD, *tokens.shape, -1 if per_row else int(start_pos), pad_left is not None, bool(cache), has_cache]
        dist.broadcast(torch.tensor(header, device=device), _src(group), group=group)
        for t in (tokens, start_pos if per_row else None, pad_left):
            if t is not None:
                dist.broadcast(t.to(device=device, dtype=torch.long).contiguous(), _src(group), group=group)

    def record(module, args, output):
        seen["cache"] = model.layers[0].attention.cache_k

    model.register_forward_hook(record)
    model.register_forward_pre_hook(announce, with_kwargs=True)


def follow(model: Transformer, group=None) -> None:
    """On ranks > 0: run the forward calls rank 0 announces, until it sends stop."""
    device = model.norm.weight.device

    def receive(*shape):
        t = torch.empty(shape, dtype=torch.long, device=device)
        dist.broadcast(t, _src(group), group=group)
        return t

    with torch.inference_mode():
        while True:
            cmd, B, T, start, has_pad, cache, has_cache = receive(7).tolist()
            if cmd == _STOP:
                return
            if cmd == _SWAP:
                _swap_rows(model, B, T, start)
                continue
            tokens = receive(B, T)
            start_pos = start if start >= 0 else receive(B)
            pad_left = receive(B) if has_pad else None
            if not has_cache:
                model.clear_cache()
            try:
                model(tokens, start_pos, pad_left=pad_left, cache=bool(cache))
            except (ValueError, RuntimeError):
                pass  # bad input: rank 0 raised the same error before any collective, and reports it


def swap_cache_rows(model: Transformer, a: int, b: int, length: int, group=None) -> None:
    """Swap slots [0, length) of KV-cache rows a and b in every layer, on every rank when rank 0
    leads: the one cache edit a batching scheduler needs besides forward calls (moving a finished
    row's slot to the end, prefilling one request in a scratch row), mirrored so ranks agree."""
    cache = model.layers[0].attention.cache_k  # (B, S_max, K/N, D); checked before the broadcast
    if cache is None or not (0 <= a < cache.shape[0] and 0 <= b < cache.shape[0] and 0 <= length <= cache.shape[1]):
        raise ValueError(f"swap_cache_rows({a}, {b}, {length}): outside the KV cache "
                         f"{None if cache is None else tuple(cache.shape[:2])}")
    if getattr(model, "tp_world_size", 1) > 1 and dist.is_initialized():
        header = torch.tensor([_SWAP, a, b, length, 0, 0, 0], device=model.norm.weight.device)
        dist.broadcast(header, _src(group), group=group)
    _swap_rows(model, a, b, length)


def _swap_rows(model, a, b, length):
    for layer in model.layers:
        for c in (layer.attention.cache_k, layer.attention.cache_v):  # (B, S_max, K/N, D)
            c[[a, b], :length] = c[[b, a], :length]


def stop_followers(model: Transformer, group=None) -> None:
    device = model.norm.weight.device
    dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0, 0, 0], device=device), _src(group), group=group)


def agree(error: str | None, group=None) -> None:
    """Collective: raise ValueError on every rank if any rank had an error (none waits forever)."""
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    first = next((e for e in errors if e), None)
    if first:
        raise ValueError(first)


# ---- launching: `annotated-llama generate --tp N` -----------------------------------------

def _shutdown():
    dist.barrier()  # MACHINE.md: tearing down right after collectives aborted without a barrier first
    dist.destroy_process_group()


def start(model_path, tp: int, *, device="cpu", dtype=None, max_seq_len=None, timeout=None) -> Transformer:
    """Under torchrun: join the process group and load this rank's slice of `model_path`. An
    error on any rank ends every rank: rank 0 raises ValueError (one line), the others exit quietly.
    `timeout` (a timedelta): how long a follower may wait for rank 0's next call (a server idles)."""
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo", timeout=timeout)
    model, error = None, None
    try:
        if world != tp:
            raise ValueError(f"--tp {tp} does not match the {world} processes torchrun started (WORLD_SIZE={world})")
        model = build_rank_model(model_path, world, rank, dtype=dtype, device=device)
        if max_seq_len is not None and max_seq_len < model.params.max_seq_len:
            from .generation import set_context_length
            set_context_length(model, max_seq_len)  # on every rank: the same checks, the same cache
    except Exception as e:  # any failure: every rank must hear of it, or the others would wait
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        error = (f"rank {rank}: " if rank else "") + (message.splitlines()[0] if message else type(e).__name__)
    try:
        agree(error)
    except ValueError:
        _shutdown()
        if rank > 0:
            raise SystemExit(2) from None  # rank 0 reports it
        raise
    return model


def run_tensor_parallel(model_path, tp: int, front_end, *, device="cpu", dtype=None, argv=None, timeout=None) -> int:
    """Run `front_end(model)` on rank 0 of `tp` processes while the others follow its forward calls
    (e.g. `serve --tp N`: the front end creates the app and runs uvicorn). Outside torchrun,
    relaunch this command (`argv`, default sys.argv[1:]) under it first."""
    if "WORLD_SIZE" not in os.environ:
        return relaunch(model_path, tp, sys.argv[1:] if argv is None else argv)
    model = start(model_path, tp, device=device, dtype=dtype, timeout=timeout)
    if dist.get_rank() > 0:
        follow(model)
        _shutdown()
        return 0
    lead(model)
    try:
        with torch.inference_mode():
            return front_end(model) or 0
    finally:
        stop_followers(model)
        _shutdown()


def build_llama(args):
    """`generate`/`chat --tp N`: a `Llama` on rank 0 over its slice of the model. The other ranks
    follow rank 0 and exit when it does; outside torchrun this relaunches the command under it."""
    import atexit

    from .generation import Llama

    if args.model is None:
        from .default_model import default_model_dir
        args.model = str(default_model_dir())
    if getattr(args, "lora", None):
        raise ValueError(f"--lora {args.lora}: not supported with --tp (merge it first: annotated-llama merge-lora)")
    if "WORLD_SIZE" not in os.environ:
        raise SystemExit(relaunch(args.model, args.tp, sys.argv[1:]))
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = start(args.model, args.tp, device=args.device, dtype=dtype, max_seq_len=args.max_seq_len)
    if dist.get_rank() > 0:
        follow(model)
        _shutdown()
        raise SystemExit(0)
    lead(model)
    atexit.register(lambda: (stop_followers(model), _shutdown()))  # however rank 0's command ends
    tokenizer = rank0_tokenizer(model, args.model, args.tokenizer)
    return Llama(model, tokenizer, seed=1 if args.seed is None else args.seed)


def rank0_tokenizer(model: Transformer, model_path, tokenizer_path=None):
    """The tokenizer rank 0 needs (the followers never tokenize), checked against the model."""
    from .tokenizer import Tokenizer, default_tokenizer_path

    tokenizer_path = tokenizer_path or default_tokenizer_path(model_path)
    if tokenizer_path is None:
        raise ValueError(f"{model_path}: no tokenizer.model found beside the weights; pass --tokenizer PATH")
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words > model.params.vocab_size:
        raise ValueError(f"{tokenizer_path}: the tokenizer has {tokenizer.n_words} ids but the model only "
                         f"{model.params.vocab_size}")
    return tokenizer


def relaunch(model_path, tp: int, argv: list[str]) -> int:
    """Run `annotated-llama ARGV` under torchrun with `tp` processes; its error as one line."""
    args, _, _ = inspect_checkpoint(model_path)
    check_divisible(args, tp)  # fail before starting any process
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "-m", "annotated_llama", *argv]
    env = dict(os.environ)
    # torchrun would set 1 thread per process (and warn); share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // tp)))
    with tempfile.TemporaryFile("w+") as log:
        rc = subprocess.call(cmd, env=env, stderr=log)  # stdout (rank 0's text) streams straight through
        log.seek(0)
        captured = log.read()
    # Rank 0 reports errors as `annotated-llama CMD: error: MESSAGE`; torchrun then adds a long
    # report of its own. Pass on rank 0's line alone.
    errors = re.findall(r"^annotated-llama [\w-]+: error: (.*)$", captured, flags=re.M)
    if rc and errors:
        raise ValueError(errors[0])
    sys.stderr.write(captured)
    if rc:
        raise OSError(f"the {tp} tensor-parallel processes failed (torchrun exit status {rc}; output above)")
    return 0
