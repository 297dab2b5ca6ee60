"""The one place a model is made from weights: an (args, state dict with Meta's names) pair,
whatever format it was read from, checked against the architecture and adopted by a Transformer
built on the "meta" device (weights/__init__.py's module docstring: safely, lazily)."""

from __future__ import annotations

import torch

from ..core.config import ModelArgs
from ..core.model import Transformer

DTYPES = {"f32": torch.float32, "float32": torch.float32, "fp32": torch.float32,
          "f16": torch.float16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def to_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of f32, f16, bf16")
    return DTYPES[str(dtype).lower()]


def _same_matrix(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    # the first row settles the usual (untied) case without reading two whole V x C matrices
    return bool(torch.equal(a[:1], b[:1])) and bool(torch.equal(a, b))


def resolve_tied_output(sd: dict[str, torch.Tensor], args: ModelArgs, weights_file, config_file,
                        detect: bool = False) -> None:
    """Bring `sd` to the tied form (no output.weight) when `args` ties the embeddings, or when
    `detect` and the file's output.weight equals the embedding (then `args` is set tied)."""
    out, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
    if out is None or emb is None:
        return
    if args.tie_word_embeddings:
        if not _same_matrix(out, emb):
            raise ValueError(f"{weights_file}: the output matrix differs from the embedding, but {config_file} "
                             "ties them (tie_word_embeddings)")
        del sd["output.weight"]
    elif detect and _same_matrix(out, emb):
        args.tie_word_embeddings = True
        del sd["output.weight"]


def check_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs, weights_file, config_file) -> None:
    """Every tensor the architecture needs, with the shape `config_file` implies; nothing else.
    A tied model's output head is its embedding: no output.weight of its own."""
    if args.vocab_size < 1:
        raise ValueError(f"{config_file}: vocab_size is -1 and no tokenizer or embedding gives it")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        del expected["output.weight"]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ValueError(f"{weights_file}: tensor {missing[0]!r}{more} missing for the architecture in {config_file}")
    if unexpected:
        raise ValueError(f"{weights_file}: unexpected tensor {unexpected[0]!r} for the architecture in {config_file}")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{weights_file}: {name} has shape {tuple(sd[name].shape)} but {config_file} "
                             f"implies {shape}")


def build_model(args: ModelArgs, sd: dict[str, torch.Tensor], dtype=None, device="cpu") -> Transformer:
    """A Transformer that adopts `sd`'s tensors (cast only where dtype/device differ)."""
    dtype = to_dtype(dtype) or sd["tok_embeddings.weight"].dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    with torch.device("meta"):  # shapes only: no memory, no random init to throw away
        model = Transformer(args)
    # .to() is a no-op (returns the mapped tensor itself) when nothing changes
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    if args.tie_word_embeddings:
        tensors["output.weight"] = tensors["tok_embeddings.weight"]
    model.load_state_dict(tensors, assign=True)
    if args.tie_word_embeddings:  # assign=True gave each module its own Parameter: share one again
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()  # non-persistent buffers were left on the meta device
    return model.eval()
