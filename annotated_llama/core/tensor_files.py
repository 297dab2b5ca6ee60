"""Reading tensor files safely: safetensors (memory-mapped) and PyTorch .pth files without
unpickling objects (weights_only=True). A bad file is a one-line ValueError naming it."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors import safe_open


def read_safetensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, memory-mapped (read lazily, copy-on-write)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such safetensors file") from None
    except Exception as e:  # SafetensorError: truncated or malformed header/data
        raise ValueError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pth, never running pickled code: weights_only=True allows only
    tensors and plain containers; mmap=True maps the file instead of reading it into memory."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the pre-1.6 (non-zip) format cannot be memory-mapped
            if "mmap" not in str(e) and "zip" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # the callable the file asked to import
        what = f" ({found.group(1)})" if found else ""
        raise ValueError(f"{path}: refused to load: the file contains pickled code or objects{what}, "
                         "not just tensors") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return sd
