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
(int8 with float32 activations measured ~10x slower on a 2-core x86 CPU), so the layers cast.

Checkpoints store the plain integers (int4 as two nibbles per byte, low nibble first) and
scales in safetensors; the device-specific packing is redone at load time. weights/gguf_load.py
fills the same layers from llama.cpp's GGUF types.
Shape letters: B batch, N output features, K input features, G groups (K / group_size).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.config import ModelArgs
from ..core.model import Transformer

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
        return int8_linear(*quantize_int8(linear.weight.detach()))

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


# The CPU kernel's packed layout (pytorch aten/src/ATen/native/cpu/int4mm_kernel.cpp): rows in blocks
# of BLOCK_N (64 with AVX512, else 32) stored column by column, BLOCK_N/2 bytes a column; in a full block
# byte j holds rows j and j + BLOCK_N/2 ("half"), in a partial one (or without AVX) rows 2j, 2j+1 ("pairs").
# Which one this build uses is found by packing a probe and checking the inverse (`_cpu_layout`).
_LAYOUTS = ((64, "half"), (32, "half"), (32, "pairs"), (64, "pairs"), (16, "pairs"))
_layout_cache: list = []


def _unpack_cpu(packed: torch.Tensor, N: int, K: int, layout) -> torch.Tensor:
    """The CPU-packed bytes (N, K/2) back to q (N, K) in [0, 15]."""
    (block, style), flat = layout, packed.reshape(-1)
    q, full = torch.empty(N, K, dtype=torch.uint8), N // block * block
    b = flat[: full * K // 2].view(full // block, K, block // 2)  # (blocks, K, block/2)
    rows = torch.cat((b & 0xF, b >> 4), 2) if style == "half" else torch.stack((b & 0xF, b >> 4), 3).flatten(2)
    q[:full] = rows.transpose(1, 2).reshape(full, K)  # rows: (blocks, K, block)
    t = flat[full * K // 2:].view(K, (N - full) // 2)  # the partial block (K, n/2): rows 2j, 2j+1 per byte
    q[full:] = torch.stack((t & 0xF, t >> 4), 2).flatten(1).t()
    return q


def _cpu_layout():
    """The (block, style) of this build's CPU packing, or None if none of _LAYOUTS matches."""
    if not _layout_cache:
        probe = torch.randint(0, 16, (144, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
        found = [lay for lay in _LAYOUTS if packed.shape == (144, 32)
                 and torch.equal(_unpack_cpu(packed, 144, 64, lay), probe.to(torch.uint8))]
        _layout_cache.append(found[0] if found else None)
    return _layout_cache[0]


def _scales_and_zeros(scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    # The kernels compute (q - 8) * scale + zero, so zero = min + 8 * scale; they take
    # (G, N, 2) = [scale, zero] per group and output channel, in bf16.
    return torch.stack((scales, mins + 8 * scales), dim=-1).transpose(0, 1).to(torch.bfloat16)  # (G, N, 2)


class Int4Linear(nn.Module):
    """Group-wise asymmetric int4 weights, kept in the layout of the device's packed kernel.

    Memory: half a byte per weight plus a bf16 (scale, zero) pair per group; the portable form
    (`nibbles`, `group_scales`, `group_mins`, for saving and fusing) is recomputed from the
    packed bytes on CPU, so no second copy is held (on CUDA one CPU copy of the nibbles is)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, device=None):
        super().__init__()
        if group_size not in INT4_GROUP_SIZES or in_features % group_size or out_features % 16:
            raise ValueError(f"int4 needs in_features % group_size == 0 (group_size in {INT4_GROUP_SIZES}) "
                             f"and out_features % 16 == 0; got {out_features}x{in_features}, group {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        # Filled by set_quantized(); the packed layout depends on the device.
        self.register_buffer("packed", torch.zeros(0, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.zeros(0, dtype=torch.bfloat16, device=device))
        self._nibbles = None  # a portable copy, only where the packed layout cannot be undone

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        m = cls(linear.in_features, linear.out_features, group_size, device=linear.weight.device)
        m.set_quantized(*quantize_int4(linear.weight.detach(), group_size))
        return m

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        """q (N, K) in [0, 15], scales and mins (N, G)."""
        device = self.packed.device
        if device.type == "cpu" and _cpu_layout() is not None:
            for a in range(0, q.shape[0], 4096):  # the int32 copy the packer wants: 4 bytes a weight
                self.set_rows(a, q[a:a + 4096], scales[a:a + 4096], mins[a:a + 4096])
            return
        if device.type == "cuda":
            # CUDA's tensor-core layout (torch >= 2.5 takes the nibble bytes, high nibble first)
            hi_first = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
            # CUDA packs K in super-tiles of 16 * inner_k_tiles (2, 4 or 8): the most that divides K
            inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)
            self.packed = torch._convert_weight_to_int4pack(hi_first, inner_k_tiles)
        else:  # an unknown CPU layout: pack in one go
            self.packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).to(device), 1)
        self._nibbles = pack_nibbles(q).cpu()  # a portable copy: this layout is not undone here
        self.scales_and_zeros = _scales_and_zeros(scales, mins).to(device)

    def set_rows(self, a: int, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        """Rows a..a+n on CPU (a a multiple of 64, only the last rows may be fewer): a layer
        filled as it is read, never holding all of q."""
        N, K = self.out_features, self.in_features
        if self.packed.shape != (N, K // 2):
            self.packed, self.scales_and_zeros = torch.empty(N, K // 2, dtype=torch.uint8), torch.empty(
                K // self.group_size, N, 2, dtype=torch.bfloat16)
        self.packed[a:a + len(q)] = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.scales_and_zeros[:, a:a + len(q)] = _scales_and_zeros(scales, mins)

    @property
    def nibbles(self) -> torch.Tensor:  # (N, K/2), low nibble first, on CPU
        if self._nibbles is not None:
            return self._nibbles
        return pack_nibbles(_unpack_cpu(self.packed.cpu(), self.out_features, self.in_features, _cpu_layout()))

    @property
    def group_scales(self) -> torch.Tensor:  # (N, G) float32: the bf16 values the kernel uses
        return self.scales_and_zeros[..., 0].t().float().cpu()

    @property
    def group_mins(self) -> torch.Tensor:  # (N, G)
        return (self.scales_and_zeros[..., 1].float() - 8 * self.scales_and_zeros[..., 0].float()).t().cpu()

    def dequantized(self) -> torch.Tensor:
        q, (N, K) = unpack_nibbles(self.nibbles).float(), (self.out_features, self.in_features)
        return (q.view(N, -1, self.group_size) * self.group_scales[..., None] + self.group_mins[..., None]).view(N, K)

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


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows with one scale per row (per token): a lookup is a gather
    and one multiply. Made from an Int8Linear it registers that layer's own tensors, so a tied
    head and embedding (Llama 3.2: `output` is `tok_embeddings`) stay one matrix in memory (a
    later `.to(device)` moves each module's buffers separately: two equal copies there)."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype
        self.register_buffer("qweight", head.weight)  # (V, C) int8, the same tensor as head.weight
        self.register_buffer("scales", head.scales)  # (V,)

    @property
    def weight(self) -> torch.Tensor:
        # The engine reads the activations' dtype and the device off `tok_embeddings.weight` (the
        # KV cache is made in that dtype): an empty (0, C) tensor carries both; the table is qweight.
        return torch.empty(0, self.embedding_dim, dtype=self.dtype, device=self.qweight.device)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.qweight[tokens].to(self.dtype) * self.scales[tokens].to(self.dtype)[..., None]  # (..., C)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]  # (V, C)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


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
    fall back to int8, so odd tiny shapes still run. A tied head (`output` is `tok_embeddings`)
    becomes int8 in every mode, shared with an Int8Embedding: int8 rows with a scale per row
    serve both the lookup and the matmul, so the tie survives, as one V x C byte matrix."""
    if mode not in MODES:
        raise ValueError(f"quantization mode must be one of {MODES}, got {mode!r}")
    if mode == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    tied = isinstance(model.output, nn.Linear) and _tied(model)
    for parent, name in _targets(model, include_output):
        linear = getattr(parent, name)
        if not isinstance(linear, nn.Linear):
            continue  # already quantized
        fits = linear.in_features % group_size == 0 and linear.out_features % 16 == 0
        if mode == "int4" and fits and not (tied and linear is model.output):
            setattr(parent, name, Int4Linear.from_linear(linear, group_size))
        else:
            setattr(parent, name, Int8Linear.from_linear(linear))
    if tied and include_output:
        model.tok_embeddings = Int8Embedding(model.output, model.tok_embeddings.weight.dtype)
    model.quantization = {"mode": mode, "group_size": group_size}
    return model


def _tied(model: Transformer) -> bool:  # the head and the embedding are one tensor (float or int8)
    emb = model.tok_embeddings
    return getattr(model.output, "weight", None) is (emb.qweight if isinstance(emb, Int8Embedding) else emb.weight)


# ---- checkpoints ---------------------------------------------------------------------------

def quantized_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Portable tensors: int8 `*.weight` + `*.scales`; int4 `*.weight_int4` (nibbles) + `*.scales` + `*.mins`.
    A tied head is written once, as `tok_embeddings.*` (safetensors stores no shared tensors)."""
    out = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if name == "output" and _tied(model):
            continue
        if isinstance(module, (Int8Linear, Int8Embedding)):
            out[prefix + "weight"] = (module.qweight if isinstance(module, Int8Embedding) else module.weight).cpu()
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
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {"mode": meta["quantization"], "group_size": int(meta.get("group_size", 128))} if "quantization" in meta else None


def int8_linear(weight: torch.Tensor, scales: torch.Tensor) -> Int8Linear:
    """An Int8Linear that adopts int8 (N, K) and scales (N,) (no copy if bf16 and aligned already)."""
    with torch.device("meta"):
        m = Int8Linear(weight.shape[1], weight.shape[0])
    # the CPU kernel's vector loads crash on a misaligned weight (as safetensors' load_file may give)
    m.weight, m.scales = weight.clone() if weight.data_ptr() % 64 else weight, scales.to(torch.bfloat16)
    return m


def build_quantized(args: ModelArgs, sd: dict[str, torch.Tensor], q: dict, weights, device="cpu",
                    dtype: torch.dtype = torch.float32) -> Transformer:
    """The model of a dir written by save_quantized, from its params and state dict (read by
    weights.load_model); `q` is its read_quantization; the non-quantized tensors get `dtype`."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device=device)
    model.to(dtype)  # float parameters only
    tied = "output.weight" not in sd and "output.weight_int4" not in sd  # the head was written once
    for parent, name in _targets(model, include_output=True):
        key = next(k for k, m in model.named_modules() if m is parent)
        prefix, linear = f"{key}.{name}." if key else f"{name}.", getattr(parent, name)
        if prefix + "weight_int4" in sd:
            m = Int4Linear(linear.in_features, linear.out_features, q["group_size"], device=device)
            qv = unpack_nibbles(sd.pop(prefix + "weight_int4"))
            m.set_quantized(qv, sd.pop(prefix + "scales"), sd.pop(prefix + "mins"))
        elif prefix + "weight" in sd and sd[prefix + "weight"].dtype == torch.int8:
            m = int8_linear(sd.pop(prefix + "weight").to(device), sd.pop(prefix + "scales").to(device))
        else:
            continue  # a float Linear (or the tied head): loaded below
        setattr(parent, name, m)
    if sd["tok_embeddings.weight"].dtype == torch.int8:
        emb = int8_linear(sd.pop("tok_embeddings.weight").to(device), sd.pop("tok_embeddings.scales").to(device))
        model.tok_embeddings = Int8Embedding(emb, dtype)
        if tied:
            model.output = emb
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if tied and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    float_missing = [k for k in missing if not k.endswith((".scales", ".packed", ".scales_and_zeros"))
                     and not _is_quantized_weight(model, k) and not (tied and k == "output.weight")]
    if float_missing or unexpected:
        raise ValueError(f"{weights}: missing tensors {float_missing[:3]}, unexpected {unexpected[:3]}")
    model.reset_rope()
    model.quantization = q
    return model


def _is_quantized_weight(model: nn.Module, key: str) -> bool:
    module = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return isinstance(module, (Int8Linear, Int4Linear, Int8Embedding))
