"""Checks on the tensors of a checkpoint that its shapes cannot show: every weight a floating
type, every value finite.

A checkpoint whose weights are int32 (a tool that wrote token ids into the wrong field), or that
holds a NaN or an infinity (a diverged run saved anyway), loads without complaint and generates
nothing but unknown pieces; said at load time, with the tensor's name, it is a one-line error.
"""

from __future__ import annotations

import math

import torch
from safetensors import safe_open

from ..core.config import ModelArgs

CHUNK = 1 << 24  # elements scanned at a time: the bool mask of one chunk is 16 MB, whatever the tensor


def check_weights(sd: dict[str, torch.Tensor], weights_file) -> None:
    """ValueError naming the first tensor of `sd` that is not floating point or not finite."""
    for name, t in sd.items():
        if not t.is_floating_point():
            raise ValueError(f"{weights_file}: tensor {name} is {str(t.dtype).removeprefix('torch.')}; model "
                             "weights must be floating point (float32, float16 or bfloat16)")
    for name, t in sd.items():
        flat = t.detach().reshape(-1)
        for start in range(0, flat.numel(), CHUNK):
            chunk = flat[start:start + CHUNK]
            # A sum is NaN or infinite if any term is (NaN and infinities propagate), and a sum runs at
            # memory speed, some 15x faster than isfinite on bfloat16 (measured on a 2-core CPU). Only
            # a sum that is not finite (or a float16 sum that overflowed) is looked at element by element.
            if math.isfinite(float(chunk.sum())):
                continue
            bad = (~torch.isfinite(chunk)).nonzero()
            if len(bad):
                index = start + int(bad[0])
                raise ValueError(f"{weights_file}: tensor {name} holds {float(flat[index])} at flat index "
                                 f"{index:,}; the weights must be finite (a diverged or corrupted checkpoint?)")


def safetensors_shapes(path) -> dict[str, tuple[int, ...]]:
    """name -> shape from a .safetensors header, without reading any tensor data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # SafetensorError: truncated or malformed header
        raise ValueError(f"{path}: not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def check_config_against_file(config_file, weights_file) -> None:
    """params.json against the tensors a safetensors file holds (ModelArgs.check_checkpoint), for
    loaders that build the model from the config before they read the tensors (quantized dirs)."""

    ModelArgs.from_params_json(config_file).check_checkpoint(safetensors_shapes(weights_file), weights_file,
                                                             config_file)
