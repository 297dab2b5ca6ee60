"""Meta's original checkpoints: `params.json` + `consolidated.NN.pth`, one file per
model-parallel rank, merged into one state dict (and split back with `save_meta(..., shards=N)`).

Meta trained with fairscale's model parallelism (Shoeybi et al. 2019, "Megatron-LM"): each
rank holds a slice of every matrix, and `consolidated.NN.pth` is rank NN's slice. Merging is
concatenation along the axis the layer was split on (HF convert_llama_weights_to_hf.py):
  - column-parallel layers (wq, wk, wv, w1, w3, output) split their *output* rows: dim 0;
  - row-parallel layers (wo, w2) split their *input* columns: dim 1;
  - LLaMA 1/2's ParallelEmbedding splits the embedding dim (dim 1); Llama 3's
    VocabParallelEmbedding splits the vocabulary (dim 0);
  - RMSNorm weights are replicated: every rank has the full vector.
Since each rank holds whole heads, concatenating wq/wk/wv rows keeps heads intact (GQA
included: rank r holds kv heads r*K/N .. (r+1)*K/N - 1, so K must divide by N).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..core.config import ModelArgs
from ..core.layout import SHARD_NAME, shard_dim, vocab_parallel
from ..core.tensor_files import load_pth

IGNORED_KEYS = {"rope.freqs"}  # LLaMA 1 checkpoints carry the rotary table; we recompute it


def shard_paths(ckpt_dir: Path) -> list[Path]:
    paths = sorted((p for p in ckpt_dir.glob("consolidated.*.pth") if SHARD_NAME.search(p.name)),
                   key=lambda p: int(SHARD_NAME.search(p.name).group(1)))
    for i, p in enumerate(paths):
        if int(SHARD_NAME.search(p.name).group(1)) != i:
            raise ValueError(f"{ckpt_dir}: model-parallel shards are not numbered 00..{len(paths) - 1:02d} "
                             f"({p.name} is out of place)")
    return paths


def merge_shards(shards: list[dict[str, torch.Tensor]], args: ModelArgs, paths: list[Path]) -> dict[str, torch.Tensor]:
    shards = [{k: v for k, v in sd.items() if k not in IGNORED_KEYS} for sd in shards]
    names = list(shards[0])
    for sd, p in zip(shards[1:], paths[1:]):
        if set(sd) != set(names):
            raise ValueError(f"{p}: its tensor names differ from {paths[0].name}'s")
    if len(shards) == 1:
        return shards[0]  # no copy: the tensors stay memory-mapped
    # The embedding's split axis tells LLaMA 1/2 (dim 1) from Llama 3 (dim 0).
    emb = shards[0].get("tok_embeddings.weight")
    by_vocab = emb is not None and vocab_parallel(emb.shape, args.dim, len(shards))
    out = {}
    for name in names:
        try:
            dim = shard_dim(name, by_vocab)
        except KeyError:
            raise ValueError(f"{paths[0]}: unexpected tensor name {name!r}") from None
        parts = [sd[name] for sd in shards]
        if dim is None:
            out[name] = parts[0]  # replicated (norms): take rank 0's copy
        else:
            try:
                out[name] = torch.cat(parts, dim=dim)
            except RuntimeError:
                shapes = ", ".join(str(tuple(p.shape)) for p in parts)
                raise ValueError(f"{paths[0].parent}: shards of {name} cannot be merged on dim {dim} ({shapes})") from None
    return out


def split_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, n: int,
                     vocab_parallel: bool) -> list[dict[str, torch.Tensor]]:
    """The inverse of merge_shards: rank r's slice of every tensor, as Meta's model parallelism holds it."""
    if args.n_kv_heads % n or args.n_heads % n:
        raise ValueError(f"--shards {n}: the model has {args.n_heads} query and {args.n_kv_heads} kv heads; "
                         f"each rank needs whole heads, so both must be divisible by {n}")
    out = [{} for _ in range(n)]
    for name, w in sd.items():
        dim = shard_dim(name, vocab_parallel)
        if dim is not None and w.shape[dim] % n:
            raise ValueError(f"--shards {n}: {name} has {w.shape[dim]} entries on dim {dim}, not divisible by {n}")
        for r in range(n):
            # clone: a chunk is a view into the whole tensor, and torch.save would store it all
            out[r][name] = w if dim is None else w.chunk(n, dim=dim)[r].clone()
    return out


def meta_params(args: ModelArgs, vocab_size: int) -> dict:
    """params.json as Meta writes it. Meta's loader calls ModelArgs(max_seq_len=..., **params),
    so max_seq_len must not appear, and LLaMA 1's ModelArgs knows no GQA/rope fields:
    write those only when they differ from the defaults."""
    p = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads}
    if args.n_kv_heads != args.n_heads:
        p["n_kv_heads"] = args.n_kv_heads
    p.update(vocab_size=vocab_size, multiple_of=args.multiple_of)
    if args.ffn_dim_multiplier is not None:
        p["ffn_dim_multiplier"] = args.ffn_dim_multiplier
    p["norm_eps"] = args.norm_eps
    if args.rope_theta != 10000.0:
        p["rope_theta"] = args.rope_theta
    full = args.to_params_json()
    for key in ("use_scaled_rope", "hidden_dim", "rope_scale_factor", "rope_low_freq_factor",
                "rope_high_freq_factor", "rope_original_context"):
        if key in full and full[key]:
            p[key] = full[key]
    return p


def load_meta(ckpt_dir: Path, params_path: Path, vocab_size: int | None) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, merged state dict). vocab_size: the tokenizer's n_words, for params.json's -1."""
    paths = shard_paths(ckpt_dir)
    args = ModelArgs.from_params_json(params_path)
    shards = [load_pth(p) for p in paths]
    sd = merge_shards(shards, args, paths)
    if args.vocab_size == -1:
        # Meta's loader: vocab_size = tokenizer.n_words; without a tokenizer, trust the tensor
        rows = sd["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in sd else None
        args.vocab_size = vocab_size if vocab_size is not None else rows
        if args.vocab_size is None:
            raise ValueError(f"{params_path}: vocab_size is -1 and there is neither a tokenizer.model nor an embedding")
    return args, sd


def llama32_rope_factor(args: ModelArgs, params_path: Path) -> None:
    """Meta's params.json for Llama 3.2 1B/3B says use_scaled_rope but names no factor, and Meta's
    reference code applied 8, which is wrong for these two: their factor is 32, as their HF
    config.json says (meta-llama/llama-models #166, #241). Tied embeddings tell them apart from
    every other Llama 3 release, so a tied model whose params.json names no factor gets 32."""
    if args.tie_word_embeddings and args.use_scaled_rope and "rope_scale_factor" not in json.loads(
            Path(params_path).read_text()):
        args.rope_scale_factor = 32.0


def save_meta(out_dir: Path, args: ModelArgs, sd: dict[str, torch.Tensor], tokenizer, shards: int = 1):
    vocab_parallel = tokenizer is not None and tokenizer.kind == "tiktoken" or args.vocab_size >= 128000
    vocab = -1 if tokenizer is not None and tokenizer.n_words == args.vocab_size else args.vocab_size
    (out_dir / "params.json").write_text(json.dumps(meta_params(args, vocab)))
    if args.tie_word_embeddings:
        # Meta's model code has no tying: its Llama 3.2 files store output.weight as a copy
        # of tok_embeddings.weight (and its loader reads them back the same way)
        sd = {**sd, "output.weight": sd["tok_embeddings.weight"]}
    for r, part in enumerate(split_state_dict(sd, args, shards, vocab_parallel)):
        torch.save(part, out_dir / f"consolidated.{r:02d}.pth")
    if tokenizer is not None:
        for name, data in tokenizer.files().items():
            (out_dir / name).write_bytes(data)
