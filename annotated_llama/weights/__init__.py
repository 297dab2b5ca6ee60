"""Loading and saving weights in every layout users hold: Meta's `consolidated.NN.pth`, HF
safetensors (a Hub snapshot as downloaded: shards, tokenizer.json, generation_config.json, Meta's
files under original/), llama.cpp's GGUF, and our own dir (params.json + model.safetensors with
Meta's names).

Every format is read into one thing, an (args, state dict with Meta's names) pair, and the model
is built from that pair in one place (`build_model`, weights/build.py):
  - safely: .pth files go through `torch.load(weights_only=True)`, which refuses pickled code;
    everything else is safetensors or GGUF, which hold only data;
  - lazily: tensors are memory-mapped from the files, the model is created on the "meta" device
    (shapes, no storage) and `load_state_dict(assign=True)` adopts the mapped tensors as its
    parameters, so a checkpoint of S bytes is not copied into a second S bytes of RAM.

Tied embeddings (Llama 3.2 1B/3B, `ModelArgs.tie_word_embeddings`): the state dicts passed
around here hold the matrix once, as `tok_embeddings.weight`, with no `output.weight`; HF files
hold it as `model.embed_tokens.weight` (no `lm_head.weight`), Meta's files as two equal copies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..core.config import ModelArgs
from ..core.tensor_files import read_safetensors
from ..core.tokenizer import Tokenizer, default_tokenizer_path
from ..transforms.quantize import build_quantized, read_quantization
from .build import build_model, check_state_dict, resolve_tied_output, to_dtype
from .checks import check_config_against_file, check_weights
from .gguf import gguf_tokenizer, save_gguf
from .gguf_load import load_gguf, load_gguf_model
from .hf import load_hf, save_hf
from .meta import llama32_rope_factor, load_meta, save_meta

FORMATS = ("hf", "meta", "gguf", "ours")
OURS_WEIGHTS = "model.safetensors"


def detect_format(path) -> str:
    """'gguf', 'hf', 'meta' or 'ours', from the files at `path`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise ValueError(f"{path}: not a GGUF file; pass a checkpoint directory or a .gguf file")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        if (path / OURS_WEIGHTS).is_file():
            return "ours"
        if any(path.glob("consolidated.*.pth")):
            return "meta"
        raise ValueError(f"{path}: params.json but no weights (expected consolidated.NN.pth or model.safetensors)")
    if meta_dir(path) != path:  # a Hub snapshot holding only Meta's files, under original/
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        raise ValueError(f"{path}: no checkpoint here; did you mean the file {ggufs[0]}?")
    raise ValueError(f"{path}: no weights found (expected params.json + consolidated.NN.pth, "
                     "config.json + model.safetensors, params.json + model.safetensors, or a .gguf file)")


def meta_dir(path: Path) -> Path:
    """Where a Meta checkpoint's files are: `path`, or its original/ (Hub snapshots of Llama 3.x
    keep Meta's params.json, consolidated.00.pth and tokenizer.model there)."""
    if not (path / "params.json").is_file() and (path / "original" / "params.json").is_file():
        return path / "original"
    return path


def load_checkpoint(path) -> tuple[ModelArgs, dict[str, torch.Tensor], Tokenizer | None]:
    """(args, state dict with Meta's names, tokenizer or None), tensors memory-mapped."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        args, sd = load_gguf(path)  # (its metadata checked against its tensors' shapes)
        check_weights(sd, path)
        return args, sd, gguf_tokenizer(path)  # the vocabulary is inside the file
    # A Hub snapshot is read from its HF side only (config.json, safetensors, tokenizer.json);
    # its original/ is used when nothing else is there, and then for weights and tokenizer both.
    path = meta_dir(path) if fmt == "meta" else path
    # Meta ships tokenizer.model beside the model dirs; HF keeps it inside
    tok_path = default_tokenizer_path(path, parent=fmt != "hf")
    tokenizer = Tokenizer(tok_path) if tok_path is not None else None
    if fmt == "hf":
        args, sd = load_hf(path)
        weights = path / "model.safetensors"
    elif fmt == "meta":
        args, sd = load_meta(path, path / "params.json", tokenizer.n_words if tokenizer else None)
        weights = path / "consolidated.00.pth"
    else:
        args = ModelArgs.from_params_json(path / "params.json")
        weights = path / OURS_WEIGHTS
        sd = read_safetensors(weights)
        if args.vocab_size == -1:  # as Meta's: taken from the tokenizer, else from the embedding
            emb = sd.get("tok_embeddings.weight")
            args.vocab_size = tokenizer.n_words if tokenizer else (emb.shape[0] if emb is not None else -1)
    config = path / ("config.json" if fmt == "hf" else "params.json")
    args.check_checkpoint({k: tuple(v.shape) for k, v in sd.items()}, weights, config)  # before any skeleton
    # Meta's files store a tied output as a copy of the embedding (its params.json has no flag)
    resolve_tied_output(sd, args, weights, config, detect=fmt == "meta")
    if fmt == "meta":
        llama32_rope_factor(args, config)
    check_state_dict(sd, args, weights, config)
    check_weights(sd, weights)  # floating point and finite (weights/checks.py)
    if tokenizer is not None:
        tokenizer.check_fits(args.vocab_size)
    return args, sd, tokenizer


def load_model(path, dtype=None, device="cpu"):
    """(model, tokenizer or None) from a Meta/HF/ours dir (a Hub snapshot too) or a .gguf file.
    dtype None keeps the stored dtype; a quantized GGUF then loads into the int8/int4 kernels
    (weights/gguf_load.py), tensor by tensor."""
    p = Path(path)
    if p.is_file() and detect_format(p) == "gguf":
        model, tokenizer = load_gguf_model(p, dtype, device), gguf_tokenizer(p)
    elif p.is_dir() and (p / OURS_WEIGHTS).is_file() and _is_quantized(p / OURS_WEIGHTS):
        # written by `annotated-llama quantize`: packed int8/int4 weights, built by quantize.py
        check_config_against_file(p / "params.json", p / OURS_WEIGHTS)  # before it builds anything
        sd = load_file(str(p / OURS_WEIGHTS))
        model = build_quantized(ModelArgs.from_params_json(p / "params.json"), sd, read_quantization(p / OURS_WEIGHTS),
                                p / OURS_WEIGHTS, device=device, dtype=to_dtype(dtype) or torch.float32)
        tok_path = default_tokenizer_path(p)
        tokenizer = Tokenizer(tok_path) if tok_path else None
    else:
        args, sd, tokenizer = load_checkpoint(path)
        model = build_model(args, sd, dtype, device)
    return model, tokenizer


def _is_quantized(weights: Path) -> bool:
    try:
        return read_quantization(weights) is not None
    except Exception:  # unreadable: load_checkpoint reports it, naming the file
        return False


def _state_dict_for_saving(model, dtype) -> dict[str, torch.Tensor]:
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if model.params.tie_word_embeddings:  # the state dict lists the shared matrix under both names
        if model.output.weight is not model.tok_embeddings.weight:
            raise ValueError("the model's ModelArgs tie the embeddings but its output.weight is a separate tensor "
                             "(set tie_word_embeddings=False to save them apart)")
        del sd["output.weight"]
    check_state_dict(sd, model.params, "the model", "its ModelArgs")
    dtype = to_dtype(dtype)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return {k: v.cpu() for k, v in sd.items()}


def save_model(model, tokenizer, path, format="hf", dtype=None, *, shards: int = 1, overwrite: bool = True):
    """Write `model` (and `tokenizer`, may be None except for GGUF) to `path` as format
    'hf', 'meta', 'gguf' (a file) or 'ours'. dtype: f32/f16/bf16 (GGUF also q8_0, q5_1,
    q5_0, q4_1, q4_0).

    Files are written under a temporary name and renamed into place, so an interrupted save
    never leaves a half-written file under a real name. Files in `path` that this format does
    not write are left alone. overwrite=False refuses an existing non-empty path."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not overwrite and path.exists() and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path}: already exists (pass --force / overwrite=True to replace it)")
    if format == "gguf":
        sd = _state_dict_for_saving(model, None)  # cast per tensor while writing (norms stay F32)
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory; GGUF output is a single file")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_gguf(tmp, model.params, sd, tokenizer, dtype)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path
    sd = _state_dict_for_saving(model, dtype)
    if path.is_file():
        raise NotADirectoryError(f"{path}: is a file; {format} output is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if format == "hf":
            save_hf(tmp, model.params, sd, tokenizer)
        elif format == "meta":
            save_meta(tmp, model.params, sd, tokenizer, shards)
        else:
            (tmp / "params.json").write_text(json.dumps(model.params.to_params_json(), indent=2))
            save_file({k: v.contiguous() for k, v in sd.items()}, tmp / OURS_WEIGHTS, metadata={"format": "pt"})
            if tokenizer is not None:
                for name, data in tokenizer.files().items():
                    (tmp / name).write_bytes(data)
        _move_into(tmp, path, format)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# Files a format's loader reads; stale ones from an earlier save of another layout would win
# format detection or shard discovery, so they are removed when a new save replaces the dir.
_STALE = {"hf": ["model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin*"],
          "meta": ["consolidated.*.pth", "model.safetensors"],
          "ours": ["config.json", "consolidated.*.pth"]}


def _move_into(tmp: Path, path: Path, format: str) -> None:
    if not path.exists():
        os.replace(tmp, path)  # one atomic rename of the whole directory
        return
    stale = list(_STALE[format])
    if (tmp / "tokenizer.json").exists():  # an old tokenizer.model would be read first
        stale.append("tokenizer.model")
    for pattern in stale:
        for old in path.glob(pattern):
            if not (tmp / old.name).exists():
                old.unlink()
    for f in tmp.iterdir():
        os.replace(f, path / f.name)  # each file atomically


__all__ = ["load_model", "save_model", "load_checkpoint", "build_model", "detect_format", "FORMATS"]
