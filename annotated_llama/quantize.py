"""Weight-only quantization: int8 per output channel, int4 in groups along the input.

Batch-1 decoding reads every weight once per token and does two FLOPs with each, so it is
bound by memory bandwidth (docs/annotated/10_speed.md): fewer bytes per weight is more tokens
per second. Only the weights are quantized; activations stay 16/32-bit, as in LLM.int8()'s
weight path (Dettmers et al. 2022), GPTQ's storage format (Frantar et al. 2022) and
gpt-fast's `quantize.py`, minus any calibration: plain round-to-nearest.

- int8: w ~ q * s, one scale per output row (N,), symmetric (q in [-127, 127]).
- int4: w ~ q * s + m per group of `group_size` inputs, asymmetric (q in [0, 15], min m).

The matmuls use PyTorch's packed kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu` / `torch._weight_int4pack_mm` on CUDA), which read the
small integers and dequantize in registers. On CPU both want bfloat16 activations
(int8 with float32 activations is ~10x slower, ../shared/MACHINE.md), so the layers cast.

Checkpoints store the plain integers (int4 as two nibbles per byte, low nibble first) and
scales in safetensors; the device-specific packing is redone at load time.
Shape letters: B batch, N output features, K input features, G groups (K / group_size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .model import Transformer

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the packed int4 kernels accept


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), scales float32 (N,)) with w ~ q * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q uint8 in [0, 15] (N, K), scales (N, G), mins (N, G)), w ~ q * s + m."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)  # (N, G, group)
    mins, maxs = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, G)
    scales = (maxs - mins).clamp(min=1e-8) / 15
    q = torch.round((wg - mins[..., None]) / scales[..., None]).clamp(0, 15)  # (N, G, group)
    return q.reshape(N, K).to(torch.uint8), scales, mins


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # (N, K) values in [0, 15] -> (N, K/2) bytes: column 2j in the low nibble, 2j+1 in the high
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4  # (N, K/2) each
    return torch.stack((low, high), dim=-1).flatten(1)  # (N, K)


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T without materialising the float weight."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight.detach())
        m = cls(linear.in_features, linear.out_features, device=q.device)
        m.weight.copy_(q)
        m.scales.copy_(scales)
        return m

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)  # (B*T, K): the kernel wants scales' dtype
        if x2.is_cuda:  # no CUDA int8-pack kernel in every build: dequantize on the fly (compile fuses it)
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scales
        else:
            y = torch._weight_int8pack_mm(x2, self.weight, self.scales)  # (B*T, N)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights, kept in the layout of the device's packed kernel."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, device=None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or in_features % group_size or out_features % 16:
            raise ValueError(f"int4 needs in_features % group_size == 0 (group_size in {INT4_GROUP_SIZES}) "
                             f"and out_features % 16 == 0; got {out_features}x{in_features}, group {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Filled by set_quantized(); the packed layout depends on the device.
        self.register_buffer("packed", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(0, dtype=torch.bfloat16, device=device))
        self.nibbles = None  # (N, K/2) portable copy, for saving

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        m = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        m.set_quantized(*quantize_int4(linear.weight.detach(), group_size))
        return m

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        """q (N, K) in [0, 15], scales and mins (N, G)."""
        self.nibbles = pack_nibbles(q).cpu()
        self.group_scales, self.group_mins = scales.float().cpu(), mins.float().cpu()
        # The kernels compute (q - 8) * scale + zero, so zero = min + 8 * scale;
        # they take (G, N, 2) = [scale, zero] per group and output channel.
        zeros = mins + 8 * scales
        sz = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        device = self.packed.device
        if device.type == "cuda":
            # CUDA's tensor-core layout (torch >= 2.5 takes the nibble bytes, high nibble first)
            hi_first = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            # CUDA packs K in super-tiles of 16 * inner_k_tiles (2, 4 or 8): the most that divides K
            inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
            self.packed = torch._convert_weight_to_int4pack(hi_first, inner_k_tiles)
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).to(device), 1)
        self.scales_and_zeros = sz.to(device=device, dtype=torch.bfloat16)

    def dequantized(self) -> torch.Tensor:
        q = unpack_nibbles(self.nibbles).float()  # (N, K)
        N, K = q.shape
        w = q.view(N, -1, self.group_size) * self.group_scales[..., None] + self.group_mins[..., None]
        return w.view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (B*T, K)
        if x2.is_cuda:
            y = torch._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)  # (..., N)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 groups of {self.group_size}"


def _targets(model: Transformer, include_output: bool):
    """(parent module, attribute name) of every Linear to quantize: all of them, as gpt-fast does."""
    for layer in model.layers:
        for name in ("wq", "wk", "wv", "wo"):
            yield layer.attention, name
        for name in ("w1", "w2", "w3"):
            yield layer.feed_forward, name
    if include_output:
        yield model, "output"


def quantize_model(model: Transformer, mode: str = "int8", group_size: int = 128,
                   include_output: bool = True) -> Transformer:
    """Swap the model's Linear layers for Int8Linear / Int4Linear, in place; returns the model.

    int4 layers whose shape the kernel cannot take (out_features % 16, in_features % group_size)
    fall back to int8, so odd tiny shapes still run."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    for parent, name in _targets(model, include_output):
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            continue  # already quantized
        if mode == "int4" and linear.in_features % group_size == 0 and linear.out_features % 16 == 0:
            setattr(parent, name, Int4Linear.from_linear(linear, group_size))
        else:
            setattr(parent, name, Int8Linear.from_linear(linear))
    model.quantization = {"mode": mode, "group_size": group_size}
    return model


# ---- checkpoints ---------------------------------------------------------------------------

def quantized_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Portable tensors: int8 `*.weight` + `*.scales`; int4 `*.weight_int4` (nibbles) + `*.scales` + `*.mins`."""
    out = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, Int8Linear):
            out[prefix + "weight"] = module.weight.cpu()
            out[prefix + "scales"] = module.scales.float().cpu()
        elif isinstance(module, Int4Linear):
            out[prefix + "weight_int4"] = module.nibbles
            out[prefix + "scales"] = module.group_scales
            out[prefix + "mins"] = module.group_mins
        elif not any(True for _ in module.children()):
            for pname, p in module.named_parameters(recurse=False):
                out[prefix + pname] = p.detach().cpu()
    return {k: v.contiguous() for k, v in out.items()}


def save_quantized(model: Transformer, out_dir, tokenizer_model: bytes | None = None):
    """Write our checkpoint dir (params.json, model.safetensors, tokenizer.model) with quantized weights."""
    from safetensors.torch import save_file
    q = getattr(model, "quantization", None)
    if q is None:
        raise ValueError("the model is not quantized: call quantize_model first")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "quantization": q["mode"], "group_size": str(q["group_size"])}
    files = {"model.safetensors": None, "params.json": json.dumps(model.params.to_params_json(), indent=2)}
    if tokenizer_model is not None:
        files["tokenizer.model"] = tokenizer_model
    for fname, content in files.items():  # write to temporary names, then rename: never a half file
        tmp = out_dir / (fname + ".tmp")
        if content is None:
            save_file(quantized_state_dict(model), str(tmp), metadata=metadata)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, out_dir / fname)


def read_quantization(path) -> dict | None:
    """{"mode", "group_size"} from a model.safetensors header, or None for a float checkpoint."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "quantization" not in meta:
        return None
    return {"mode": meta["quantization"], "group_size": int(meta.get("group_size", 128))}


def load_quantized(ckpt_dir, device="cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    """Load a dir written by save_quantized; the non-quantized tensors get `dtype`."""
    from safetensors.torch import load_file
    ckpt_dir = Path(ckpt_dir)
    weights = ckpt_dir / "model.safetensors"
    q = read_quantization(weights)
    if q is None:
        raise ValueError(f"{weights}: not a quantized checkpoint (no 'quantization' metadata)")
    args = ModelArgs.from_params_json(ckpt_dir / "params.json")
    sd = load_file(str(weights))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    for parent, name in _targets(model, include_output=True):
        key = next(k for k, m in model.named_modules() if m is parent)
        prefix = f"{key}.{name}." if key else f"{name}."
        linear = getattr(parent, name)
        if prefix + "weight_int4" in sd:
            m = Int4Linear(linear.in_features, linear.out_features, q["group_size"], device=device)
            qv = unpack_nibbles(sd.pop(prefix + "weight_int4"))
            m.set_quantized(qv, sd.pop(prefix + "scales"), sd.pop(prefix + "mins"))
        elif sd[prefix + "weight"].dtype == torch.int8:
            m = Int8Linear(linear.in_features, linear.out_features, device=device)
            m.weight.copy_(sd.pop(prefix + "weight"))
            m.scales.copy_(sd.pop(prefix + "scales"))
        else:
            continue  # a float Linear: loaded below
        setattr(parent, name, m)
    model.to(dtype)  # float parameters only: the int buffers keep their dtype
    for m in model.modules():  # `to(dtype)` cast the bf16 scales; the kernels want them in bf16
        if isinstance(m, Int8Linear):
            m.scales = m.scales.to(torch.bfloat16)
        elif isinstance(m, Int4Linear):
            m.scales_and_zeros = m.scales_and_zeros.to(torch.bfloat16)
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in sd.items()}, strict=False)
    float_missing = [k for k in missing if not k.endswith((".scales", ".packed", ".scales_and_zeros"))
                     and not _is_quantized_weight(model, k)]
    if float_missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {float_missing[:3]}, unexpected {unexpected[:3]}")
    model.reset_rope()
    model.quantization = q
    return model


def _is_quantized_weight(model: nn.Module, key: str) -> bool:
    module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return isinstance(module, (Int8Linear, Int4Linear))
