"""The one GGUF reader: the key/value header (metadata, the tokenizer's vocabulary) and the
tensor infos, from a file (memory-mapped copy-on-write) or a buffer. Tokenizer (a .gguf
tokenizer) and weights/gguf.py (a .gguf model) both read through it.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

# The gguf package's GGUFReader builds a numpy view per vocabulary entry: 13.6 s for Llama 3's
# 128k-token, 280k-merge header (tests/assets/llama3-bpe.gguf.xz) on this project's 2-core test
# machine, against 0.33 s with the vocabulary for the walk below, so the header is walked here
# directly; tests check the result against GGUFReader. Layout (ggml's docs/gguf.md, v3): "GGUF", u32 version, u64 tensor
# count, u64 kv count; kvs (string key, u32 type, value); tensor infos (string name, u32
# n_dims, u64 dims innermost-first, u32 ggml type, u64 offset); padding to general.alignment;
# the tensor data. Strings are u64 length + UTF-8; arrays are u32 item type, u64 count, items.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_gguf(source, vocabulary: bool = False, tensors: bool = True) -> tuple[dict, dict[str, tuple], int]:
    """(metadata, {name: (ggml type, numpy shape, raw bytes)}, the offset where the key/value
    section ends). `source`: a path (memory-mapped copy-on-write) or a buffer. The tokenizer.*
    arrays (the vocabulary) are skipped unless `vocabulary`; the tensor infos unless `tensors`.
    A malformed or truncated header is a ValueError."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    else:
        mm = source
    try:
        return _read(mm, vocabulary, tensors)
    except struct.error:
        raise ValueError("truncated GGUF header") from None


def _read(mm, vocabulary: bool, tensors: bool):
    if mm[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
    if len(mm) < 24:
        raise ValueError("truncated GGUF header")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    pos = 24

    def unpack(fmt):
        nonlocal pos
        out = struct.unpack_from(fmt, mm, pos)
        pos += struct.calcsize(fmt)
        return out

    def string(keep=True):
        nonlocal pos
        (n,) = unpack("<Q")
        pos += n
        if pos > len(mm):
            raise ValueError("truncated string")
        return mm[pos - n:pos].decode("utf-8") if keep else None

    def value(kind, keep):
        nonlocal pos
        if kind == STRING:
            return string(keep)
        if kind == ARRAY:
            item, count = unpack("<IQ")
            if item in _SCALARS and item != 7:  # numbers: skip or read in one go
                size = struct.calcsize(_SCALARS[item])
                pos += size * count
                return np.frombuffer(mm, _SCALARS[item], count, pos - size * count).tolist() if keep else None
            return [value(item, keep) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return unpack(_SCALARS[kind])[0]

    meta = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = unpack("<I")
        keep = vocabulary or not (key.startswith("tokenizer.") and kind == ARRAY)
        v = value(kind, keep)
        if keep:
            meta[key] = v
    kv_end = pos
    if not tensors:
        return meta, {}, kv_end
    # llama.cpp's package: the GGML types and their block sizes
    import gguf as g  # here: ~150 ms to import (yaml), and `import annotated_llama` loads this module
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = unpack("<I")
        dims = unpack(f"<{n_dims}Q")
        ttype, offset = unpack("<IQ")
        try:
            ttype = g.GGMLQuantizationType(ttype)
        except ValueError:
            raise ValueError(f"tensor {name}: unknown GGML type {ttype}") from None
        infos.append((name, ttype, tuple(reversed(dims)), offset))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    out = {}
    for name, ttype, shape, offset in infos:
        block, size = g.GGML_QUANT_SIZES[ttype]
        nbytes = int(np.prod(shape)) // block * size
        if start + offset + nbytes > len(mm):
            raise ValueError(f"truncated: tensor {name} ends past the end of the file")
        out[name] = (ttype, shape, np.frombuffer(mm, np.uint8, nbytes, start + offset))
    return meta, out, kv_end
