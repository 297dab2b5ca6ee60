"""A GGUF file into the model one tensor at a time: quantized tensors into quantize.py's kernels.

A 4-bit GGUF of S bytes expanded to float32 would need ~7 x S; here each tensor is dequantized
by the `gguf` package (gguf.quants.dequantize, every type it knows) a few rows at a time, turned
into the kernel chosen by its type, and its mapped file pages are dropped again, so the model
ends up 0.9-1.7 x S (bench/gguf_memory.py) and the peak a little above. Per tensor, by the GGML
type's bits per weight:

  - Q4_0, Q4_1, Q4_K: every 32 weights are w = s * q + m with q in [0, 15] (ggml-common.h:
    block_q4_0 has w = d * (q - 8), block_q4_1 w = d * q + m, block_q4_K 8 sub-blocks of 32 with
    6-bit scales and mins), which is exactly Int4Linear with groups of 32: the integers carry
    over unchanged, only s and m are rounded to the kernel's bf16;
  - other types of at most 5 bits per weight (IQ4_NL, IQ4_XS, Q3_K, Q2_K, the IQ3/IQ2/IQ1 and
    TQ types): Int4Linear with groups of 32, re-quantized from the values (fit_int4);
  - more bits (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0): Int8Linear, re-quantized per output row (the int8
    kernel has one scale per row);
  - F32, F16, BF16 matrices stay as stored, mapped from the file (CastLinear);
  - a quantized token_embd becomes an Int8Embedding (int8 rows); tied, it is the head as well.
Norms (and a float token_embd) are float32, and so are the activations, as llama.cpp computes them.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import ModelArgs
from ..core.layout import META_TO_GGUF, rename
from ..core.model import Transformer
from ..transforms.quantize import Int4Linear, Int8Embedding, _cpu_layout, int8_linear, quantize_int8
from .build import build_model, check_state_dict, to_dtype
from .gguf import FLOAT_TYPES, _gguf, float_tensor, open_gguf, release_pages

CHUNK = 1 << 18  # weights dequantized at a time: 1 MiB of float32
GROUP = 32  # Int4Linear's groups for GGUF tensors: the block size of Q4_0/Q4_1, Q4_K's sub-blocks
EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")


class CastLinear(nn.Linear):
    """A float Linear stored in another dtype than the activations (a 16-bit matrix inside a
    quantized model): the input is cast to the weight's dtype and the output back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


def bits_per_weight(ttype) -> float:
    block, size = _gguf().GGML_QUANT_SIZES[ttype]
    return size * 8 / block


def kernel_for(ttype) -> str:
    """'float', 'int4' or 'int8': what load_gguf_model turns a matrix of this type into."""
    if ttype.name in FLOAT_TYPES:
        return "float"
    return "int4" if bits_per_weight(ttype) <= 5.0 else "int8"


def _row_chunks(shape, raw: np.ndarray):
    """(a, b) row ranges of about CHUNK weights (whole 64-row blocks: Int4Linear packs them as
    they come); after each, the mapped pages of rows a..b are dropped again (release_pages) and
    glibc is asked to hand freed memory back (it keeps freed blocks of up to its adaptive mmap
    threshold, ~1 MiB here, in the heap: ~20% more resident memory otherwise)."""
    N, K = shape
    step, row = max(64, CHUNK // K // 64 * 64), raw.nbytes // N
    for a in range(0, N, step):
        b = min(a + step, N)
        yield a, b
        release_pages(raw[a * row:b * row])
        _trim()
    # the kernel maps whole page-cache folios around a fault, so later chunks re-map pages of
    # earlier ones: once the tensor is done, drop every mapped page of the file
    release_pages(raw, whole_file=True)


def _trim():
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def dequantize_rows(ttype, shape, raw: np.ndarray, a: int, b: int) -> torch.Tensor:
    """Rows a..b of a 2-D tensor (or all of a 1-D one) as float32 (b - a, K)."""
    g = _gguf()
    if ttype.name in FLOAT_TYPES:
        return float_tensor(ttype, shape, raw, g).reshape(-1, shape[-1])[a:b].float()
    row = raw.nbytes // int(np.prod(shape[:-1]))
    return torch.from_numpy(g.quants.dequantize(raw[a * row:b * row].reshape(b - a, row), ttype))


def check_types(raw: dict, path) -> None:
    """Every tensor's type is a float one or one the gguf package dequantizes."""
    for name, (ttype, _, _) in raw.items():
        if ttype.name not in FLOAT_TYPES and not hasattr(_gguf().quants, ttype.name):
            raise ValueError(f"{path}: tensor {rename(name, META_TO_GGUF)} is {ttype.name}, which the gguf "
                             "package cannot dequantize")


def dequantize(ttype, shape, raw: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """The whole tensor in `dtype`, converted a chunk of rows at a time."""
    out = torch.empty(shape, dtype=dtype)
    rows = out.view(-1, shape[-1])
    for a, b in _row_chunks(rows.shape, raw):
        rows[a:b] = dequantize_rows(ttype, rows.shape, raw, a, b)
    return out


def load_gguf(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """(args, state dict): float tensors mapped as stored, quantized ones dequantized to
    float32 (the whole model: load_model reads a quantized file into kernels instead)."""
    g = _gguf()
    args, raw, _ = open_gguf(path)
    check_types(raw, path)
    sd = {name: float_tensor(*entry, g) if entry[0].name in FLOAT_TYPES else dequantize(*entry)
          for name, entry in raw.items()}
    return args, sd  # tied: no output.weight (build_model ties it)


def _q4_grid(ttype, data: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, mins) (rows, K/32) of Q4_0/Q4_1/Q4_K rows, as the package's dequantization
    computes them in float32 (its w = s * q + m, ggml-common.h's block layouts)."""
    g = _gguf()
    n = data.shape[0]

    def half(blocks, i):  # the fp16 at bytes i, i+1 of every block
        return np.ascontiguousarray(blocks[:, i:i + 2]).view(np.float16).astype(np.float32)

    if ttype.name == "Q4_K":  # 144 bytes per 256 weights: d, dmin, 12 bytes of 6-bit (scale, min), nibbles
        blocks = data.reshape(-1, 144)
        sc, mn = g.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))  # (blocks, 8) each
        s, m = half(blocks, 0) * sc.astype(np.float32), -(half(blocks, 2) * mn.astype(np.float32))
    else:  # Q4_0: d, 16 bytes (w = d * (q - 8)); Q4_1: d, m, 16 bytes (w = d * q + m)
        blocks = data.reshape(-1, 18 if ttype.name == "Q4_0" else 20)
        s = half(blocks, 0)
        m = -8 * s if ttype.name == "Q4_0" else half(blocks, 2)
    return torch.from_numpy(s.reshape(n, -1)), torch.from_numpy(m.reshape(n, -1))


def fit_int4(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4 for values already on another grid (IQ4's non-uniform levels, Q3_K's and
    Q2_K's sub-blocks of 16): round to nearest loses ~8% (relative RMS) on such values, so try
    ranges shrunk around the middle (clipping outliers can pay) and refine by least squares (the
    best s, m for these q, then the best q for them): ~6.5% on IQ4_NL and Q3_K_M tensors."""
    N, K = w.shape
    wg = w.reshape(N, K // group, group)  # (N, G, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    best = None
    for f in (1.0, 0.9, 0.8, 0.7):
        sf = ((hi - lo) * (f / 15)).clamp(min=1e-12)
        mf = (hi + lo) / 2 - 7.5 * sf
        err = (((wg - mf) / sf).round().clamp(0, 15) * sf + mf - wg).square().sum(-1, keepdim=True)  # (N, G, 1)
        if best is None:
            best, s, m = err, sf, mf
        else:
            better = err < best
            best, s, m = torch.where(better, err, best), torch.where(better, sf, s), torch.where(better, mf, m)
    wm, s0, m0 = wg.mean(-1, keepdim=True), s, m
    for _ in range(2):
        q = ((wg - m) / s).round().clamp(0, 15)
        dq = q - q.mean(-1, keepdim=True)
        var = dq.square().sum(-1, keepdim=True)
        s_new = (dq * (wg - wm)).sum(-1, keepdim=True) / var.clamp(min=1e-12)
        s = torch.where((var > 0) & (s_new != 0), s_new, s)
        m = wm - s * q.mean(-1, keepdim=True)
    err = (((wg - m) / s).round().clamp(0, 15) * s + m - wg).square().sum(-1, keepdim=True)
    s, m = torch.where(err < best, s, s0), torch.where(err < best, m, m0)  # the refinement may not help
    q = ((wg - m) / s).round().clamp(0, 15)
    return q.to(torch.uint8).view(N, K), s[..., 0], m[..., 0]


def int4_rows(ttype, shape, raw: np.ndarray):
    """(a, q uint8 (n, K), scales (n, K/32), mins (n, K/32)) for rows a..a+n, chunk by chunk."""
    N, K = shape
    row = raw.nbytes // N
    for a, b in _row_chunks(shape, raw):
        w = dequantize_rows(ttype, shape, raw, a, b)  # (n, K)
        if ttype.name in EXACT_INT4:
            s, m = _q4_grid(ttype, raw[a * row:b * row].reshape(b - a, row))  # (n, G)
            # Q4_0's d is negative when the block's largest magnitude is positive (d = max / -8)
            steps = (w.view(b - a, -1, GROUP) - m[..., None]) / torch.where(s == 0, 1, s)[..., None]  # (n, G, 32)
            yield a, steps.round().clamp(0, 15).to(torch.uint8).view(b - a, K), s, m
        else:
            yield a, *fit_int4(w, GROUP)


def to_int8(ttype, shape, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (N, K), scales (N,)): quantize_int8 of each chunk of dequantized rows."""
    N, K = shape
    q, scales = torch.empty(N, K, dtype=torch.int8), torch.empty(N)
    for a, b in _row_chunks(shape, raw):
        q[a:b], scales[a:b] = quantize_int8(dequantize_rows(ttype, shape, raw, a, b))
    return q, scales


def _matrix(ttype, shape, raw, device) -> nn.Module:
    kind, (N, K) = kernel_for(ttype), shape
    if kind == "float":
        with torch.device("meta"):
            m = CastLinear(K, N, bias=False)
        m.weight = nn.Parameter(float_tensor(ttype, shape, raw, _gguf()).to(device))
        return m
    if kind == "int4" and K % GROUP == 0 and N % 16 == 0:
        m = Int4Linear(K, N, GROUP, device=device)
        if m.packed.device.type == "cpu" and _cpu_layout() is not None:
            for a, q, scales, mins in int4_rows(ttype, shape, raw):
                m.set_rows(a, q, scales, mins)  # packed as read: no (N, K) copy of q
        else:
            m.set_quantized(*(torch.cat(parts) for parts in list(zip(*int4_rows(ttype, shape, raw)))[1:]))
    else:  # 5 to 8 bits, or a shape the int4 kernel cannot take
        q, scales = to_int8(ttype, shape, raw)
        m = int8_linear(q.to(device), scales.to(device))
    return m


def load_gguf_model(path, dtype=None, device="cpu") -> Transformer:
    """The model of a llama GGUF file. dtype None: quantized tensors into the kernels (the
    module docstring), float ones as stored; a float dtype: every tensor converted to it."""

    path, g = Path(path), _gguf()
    args, raw, _ = open_gguf(path)
    check_state_dict({k: torch.empty(v[1], device="meta") for k, v in raw.items()}, args, path, path)
    check_types(raw, path)
    dtype = to_dtype(dtype)
    if dtype is not None or all(v[0].name in FLOAT_TYPES for v in raw.values()):
        sd = {}
        for name, (ttype, shape, data) in raw.items():
            if dtype is None:  # all float: mapped as stored, as every other format
                sd[name] = float_tensor(ttype, shape, data, g)
            else:
                sd[name] = dequantize(ttype, shape, data, dtype)
        return build_model(args, sd, dtype, device)  # which ties a tied head to the embedding

    with torch.device("meta"):
        model = Transformer(args)
    counts = {}
    for name, (ttype, shape, data) in raw.items():
        counts[ttype.name] = counts.get(ttype.name, 0) + 1
        parent_name, attr = name.rsplit(".", 1)
        if name == "tok_embeddings.weight":
            continue  # below, with the tied head
        if len(shape) == 1:  # norms: float32 (mapped, as llama.cpp writes them F32)
            t = float_tensor(ttype, shape, data, g) if ttype.name in FLOAT_TYPES else dequantize(ttype, shape, data)
            setattr(model.get_submodule(parent_name), attr, nn.Parameter(t.to(device=device, dtype=torch.float32)))
            continue
        owner, child = parent_name.rsplit(".", 1) if "." in parent_name else ("", parent_name)
        setattr(model.get_submodule(owner), child, _matrix(ttype, shape, data, device))
    ttype, shape, data = raw["tok_embeddings.weight"]
    if kernel_for(ttype) == "float":  # float32: the engine takes the activations' dtype from this table
        model.tok_embeddings.weight = nn.Parameter(float_tensor(ttype, shape, data, g).to(device, torch.float32))
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight
    else:
        q, scales = to_int8(ttype, shape, data)
        head = int8_linear(q.to(device), scales.to(device))
        model.tok_embeddings = Int8Embedding(head, torch.float32)
        if args.tie_word_embeddings:
            model.output = head  # one int8 matrix for the lookup and the head
    model.reset_rope()
    has_int4 = any(isinstance(m, Int4Linear) for m in model.modules())
    model.quantization = {"mode": "int4" if has_int4 else "int8", "group_size": GROUP, "gguf_types": counts}
    return model.eval()
