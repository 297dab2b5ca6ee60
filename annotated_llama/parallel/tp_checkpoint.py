"""Reading one rank's slice of a checkpoint, for tensor parallelism (tensor_parallel.py).

Each rank reads only the rows or columns it keeps, so its peak memory while loading is about
1/N of the model plus one tensor:
  - Meta's `consolidated.NN.pth` shards (memory-mapped: torch.load(mmap=True)), with any shard
    count whose slices line up with the ranks' (8 shards on 2 ranks, 1 shard on 4 ranks);
  - safetensors, ours (Meta names) or HF's (renamed, rotary q/k rows un-permuted), through
    `get_slice`, one tensor at a time.
`build_rank_model` puts the slice into a model built on the meta device and parallelized.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.config import ModelArgs
from ..core.layout import META_TO_HF, SHARD_NAME, permute_to_meta, rename, shard_dim, vocab_parallel
from ..core.model import Transformer
from ..core.tensor_files import load_pth
from ..weights import detect_format, meta_dir
from .tensor_parallel import check_divisible, parallelize

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


def inspect_checkpoint(path) -> tuple[ModelArgs, str, int]:
    """(ModelArgs, kind, number of shards) of a checkpoint dir; kind is meta, safetensors or hf."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tensor parallelism needs a checkpoint directory "
                                "(params.json + consolidated.NN.pth or model.safetensors, or an HF config.json dir)")
    fmt = detect_format(path)  # the loader's own detection (weights/__init__.py)
    if fmt == "hf":
        return ModelArgs.from_hf_config(json.loads((path / "config.json").read_text())), "hf", 1
    path = meta_dir(path)
    args = ModelArgs.from_params_json(path / "params.json")
    if fmt == "ours":
        return args, "safetensors", 1
    found = sorted(p for p in path.glob("consolidated.*.pth") if SHARD_NAME.search(p.name))
    if not found:
        raise FileNotFoundError(f"{path}: no consolidated.NN.pth or model.safetensors")
    # Meta's params.json records neither the shard count nor (vocab_size -1) the vocabulary: read
    # both off the shapes in any one shard. mmap: only the pickled header is read, no tensor data.
    try:
        shard = load_pth(found[0])  # pickled objects: refused in one line, naming the file
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
        shards[s] = load_pth(paths[s])
    emb = shards[first]["tok_embeddings.weight"]
    # (V, C/S) for LLaMA 1/2's ParallelEmbedding, (V/S, C) for Llama 3's VocabParallelEmbedding
    embedding_dim = 0 if vocab_parallel(emb.shape, args.dim, S) else 1
    sd = {}
    for name, full in _full_shapes(args).items():
        d = shard_dim(name, vocab_parallel=embedding_dim == 0)
        lo, hi = (0, 1) if d is None else (rank * full[d] // N, (rank + 1) * full[d] // N)
        q = 1 if d is None else full[d] // S  # rows (or columns) per shard
        sources, pieces = [], []
        for s in ([first] if d is None else range(lo // q, (hi - 1) // q + 1)):
            if name not in shards[s]:
                raise ValueError(f"{paths[s]}: tensor {name} is missing")
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
            raise ValueError(f"{path}: tensor {stored} is missing")
        d = shard_dim(name, vocab_parallel=False)
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
        sd, embedding_dim = _read_meta(meta_dir(path), args, n_shards, world_size, rank, convert)
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
