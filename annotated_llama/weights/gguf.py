"""GGUF, llama.cpp's single-file format, read and written through llama.cpp's own `gguf` package.

A GGUF file is a key/value header (architecture hyper-parameters under `llama.*`, the
vocabulary under `tokenizer.ggml.*`) followed by aligned tensor data. Tensor names are
llama.cpp's (`blk.N.attn_q.weight`, ...), and their layout is Meta's: llama.cpp's LLaMA uses
the interleaved rotary pairs, so unlike HF no q/k permutation is needed (REFERENCE section 2,
"GGUF"). GGUF lists dims innermost-first; the package reverses them for us.

Types written: F32, F16, BF16, Q8_0 (blocks of 32 weights sharing one fp16 scale:
w ~ d * q with q in int8, d = max|w| / 127; the error is at most d/2 per weight).
Read back: F32, F16, BF16, Q8_0, Q4_0 (dequantized to float32 by the package).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import ModelArgs
from ..model import rope_frequencies
from .hf import rename

# Meta name -> GGUF name, "{}" the layer index (llama.cpp's tensor map for LLM_ARCH_LLAMA).
META_TO_GGUF = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
    "layers.{}.attention.wq.weight": "blk.{}.attn_q.weight",
    "layers.{}.attention.wk.weight": "blk.{}.attn_k.weight",
    "layers.{}.attention.wv.weight": "blk.{}.attn_v.weight",
    "layers.{}.attention.wo.weight": "blk.{}.attn_output.weight",
    "layers.{}.feed_forward.w1.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.feed_forward.w3.weight": "blk.{}.ffn_up.weight",
    "layers.{}.feed_forward.w2.weight": "blk.{}.ffn_down.weight",
    "layers.{}.attention_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "blk.{}.ffn_norm.weight",
}
GGUF_TO_META = {v: k for k, v in META_TO_GGUF.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency divisors, as llama.cpp's converter writes them
OUR_KEYS = "annotated_llama.rope."  # the 3.1 scaling parameters themselves (llama.cpp ignores these keys)


def _gguf():
    import gguf  # llama.cpp's package: imported on use, so the rest of the package never needs it

    return gguf


def file_types():
    g = _gguf()
    T, F = g.GGMLQuantizationType, g.LlamaFileType
    return {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16),
            "q8_0": (T.Q8_0, F.MOSTLY_Q8_0)}


# ---- writing ---------------------------------------------------------------------------------

def _encode(t: torch.Tensor, qtype, g) -> tuple[np.ndarray, object]:
    """(array for GGUFWriter.add_tensor, its GGML type). 1-D tensors (norms, rope factors) stay
    F32, as llama.cpp's converter keeps them; Q8_0 needs rows divisible by its block of 32."""
    T = g.GGMLQuantizationType
    if t.dim() == 1 or qtype == T.F32:
        return t.float().numpy(), T.F32
    if qtype == T.F16:
        return t.to(torch.float16).numpy(), T.F16
    if qtype == T.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), T.BF16
    block = g.GGML_QUANT_SIZES[T.Q8_0][0]
    if t.shape[-1] % block:  # llama.cpp's converter falls back to F16 the same way
        return t.to(torch.float16).numpy(), T.F16
    return g.quants.quantize(t.float().numpy(), T.Q8_0), T.Q8_0


def _add_tokenizer(w, tokenizer, g) -> None:
    from ..tokenizer import GGUF_BYTE, GGUF_CONTROL, GGUF_NORMAL, GGUF_UNKNOWN, GGUF_UNUSED

    if tokenizer.kind == "sentencepiece":
        sp = tokenizer.sp
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        types = [GGUF_CONTROL if sp.is_control(i) else GGUF_UNKNOWN if sp.is_unknown(i) else GGUF_BYTE
                 if sp.is_byte(i) else GGUF_UNUSED if sp.is_unused(i) else GGUF_NORMAL for i in range(n)]
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto.FromString(sp.serialized_model_proto())
        w.add_tokenizer_model("llama")  # SentencePiece BPE with scores
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(sp.unk_id())
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    else:
        from ..tokenizer import _gpt2_bytes_to_unicode
        from .hf import tiktoken_merges

        byte_char = _gpt2_bytes_to_unicode()
        text = {rank: "".join(byte_char[b] for b in piece) for piece, rank in tokenizer.tt._mergeable_ranks.items()}
        text.update({i: name for name, i in tokenizer.special_tokens.items()})
        specials = set(tokenizer.special_tokens.values())
        w.add_tokenizer_model("gpt2")  # byte-level BPE with merges
        w.add_tokenizer_pre("llama-bpe")  # llama.cpp's name for Llama 3's pre-tokenizer regex
        w.add_token_list([text[i] for i in range(len(text))])
        w.add_token_types([GGUF_CONTROL if i in specials else GGUF_NORMAL for i in range(len(text))])
        w.add_token_merges([f"{text[tokenizer.tt._mergeable_ranks[a]]} {text[tokenizer.tt._mergeable_ranks[b]]}"
                            for a, b in tiktoken_merges(tokenizer.tt._mergeable_ranks)])
        if "<|eot_id|>" in tokenizer.special_tokens:
            w.add_eot_token_id(tokenizer.special_tokens["<|eot_id|>"])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_add_bos_token(True)  # Meta's encode(s, bos=True, eos=False)
    w.add_add_eos_token(False)


def save_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor], tokenizer, dtype=None) -> None:
    """Write a GGUF file llama.cpp runs as is. dtype: f32, f16, bf16 or q8_0 (None: the
    model's own 16-bit type, else f32)."""
    g = _gguf()
    if tokenizer is None:
        raise ValueError(f"{path}: GGUF embeds the vocabulary; a tokenizer is needed")
    stored = sd["tok_embeddings.weight"].dtype
    key = str(dtype).lower() if dtype is not None else {torch.float16: "f16", torch.bfloat16: "bf16"}.get(stored, "f32")
    key = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "torch.float32": "f32",
           "torch.float16": "f16", "torch.bfloat16": "bf16"}.get(key, key)
    if key not in file_types():
        raise ValueError(f"GGUF dtype {dtype!r}: use one of {', '.join(file_types())}")
    qtype, file_type = file_types()[key]

    w = g.GGUFWriter(str(path), "llama")
    w.add_name(Path(path).stem.lstrip(".").split(".tmp-")[0] or "llama")
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(file_type)
    if qtype not in (g.GGMLQuantizationType.F32, g.GGMLQuantizationType.F16, g.GGMLQuantizationType.BF16):
        w.add_quantization_version(g.GGML_QUANT_VERSION)
    _add_tokenizer(w, tokenizer, g)
    tensors = dict(sd)
    if args.use_scaled_rope:
        # llama.cpp divides each rotary frequency by rope_freqs[i]: the 3.1 rescaling as data.
        base = rope_frequencies(ModelArgs(**{**args.to_params_json(), "use_scaled_rope": False}))
        tensors[ROPE_FREQS] = base / rope_frequencies(args)
        for name in ("scale_factor", "low_freq_factor", "high_freq_factor", "original_context"):
            w.add_float32(OUR_KEYS + name, float(getattr(args, "rope_" + name)))
    for name, t in tensors.items():
        array, ttype = _encode(t.detach().cpu(), qtype, g)
        w.add_tensor(name if name == ROPE_FREQS else rename(name, META_TO_GGUF), array, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- reading ---------------------------------------------------------------------------------
# The gguf package's GGUFReader builds a numpy view per vocabulary entry (seconds for a 32k
# vocabulary, ~8 s for Llama 3's 280k merges), so the header is walked here directly; tests
# check the result against GGUFReader. Layout (GGUF v3): "GGUF", u32 version, u64 tensor
# count, u64 kv count; kvs (string key, u32 type, value); tensor infos (string name, u32
# n_dims, u64 dims innermost-first, u32 ggml type, u64 offset); padding to general.alignment;
# the tensor data. Strings are u64 length + UTF-8; arrays are u32 item type, u64 count, items.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


def read_gguf(path: Path) -> tuple[dict, dict[str, tuple[int, tuple[int, ...], np.ndarray]], int]:
    """(metadata without the tokenizer.* arrays, {name: (ggml type, numpy shape, raw bytes)},
    the offset where the key/value section ends), the bytes memory-mapped copy-on-write."""
    import mmap
    import struct

    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    if mm[:4] != b"GGUF":
        raise ValueError("not a GGUF file (bad magic)")
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
        return mm[pos - n:pos].decode("utf-8") if keep else None

    def value(kind, keep):
        nonlocal pos
        if kind == STRING:
            return string(keep)
        if kind == ARRAY:
            item, count = unpack("<IQ")
            if item in _SCALARS:  # numbers: skip or read in one go
                size = struct.calcsize(_SCALARS[item])
                pos += size * count
                return np.frombuffer(mm, _SCALARS[item], count, pos - size * count).tolist() if keep else None
            return [value(item, keep) for _ in range(count)]
        return unpack(_SCALARS[kind])[0]

    meta = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = unpack("<I")
        keep = not key.startswith("tokenizer.")  # the vocabulary is the Tokenizer's business
        v = value(kind, keep)
        if keep:
            meta[key] = v
    kv_end = pos
    g = _gguf()
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = unpack("<I")
        dims = unpack(f"<{n_dims}Q")
        ttype, offset = unpack("<IQ")
        infos.append((name, g.GGMLQuantizationType(ttype), tuple(reversed(dims)), offset))
    align = meta.get("general.alignment", 32)
    start = (pos + align - 1) // align * align
    tensors = {}
    for name, ttype, shape, offset in infos:
        block, size = g.GGML_QUANT_SIZES[ttype]
        nbytes = int(np.prod(shape)) // block * size
        if start + offset + nbytes > len(mm):
            raise ValueError(f"truncated: tensor {name} ends past the end of the file")
        tensors[name] = (ttype, shape, np.frombuffer(mm, np.uint8, nbytes, start + offset))
    return meta, tensors, kv_end


def _decode(ttype, shape, raw: np.ndarray, g) -> torch.Tensor:
    T = g.GGMLQuantizationType
    if ttype == T.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape))  # zero-copy
    if ttype == T.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape))
    if ttype == T.BF16:
        return torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)
    if ttype in (T.Q8_0, T.Q4_0):
        byte_shape = g.quants.quant_shape_to_byte_shape(shape, ttype)
        return torch.from_numpy(g.quants.dequantize(raw.reshape(byte_shape), ttype))  # float32
    raise ValueError(f"GGML type {ttype.name} is not supported (F32, F16, BF16, Q8_0, Q4_0 are)")


def load_gguf(path: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    g = _gguf()
    try:
        meta, tensors, _ = read_gguf(path)
    except (ValueError, OSError, UnicodeDecodeError, __import__("struct").error) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None

    def get(key, default=None):
        if key in meta:
            return meta[key]
        if default is None:
            raise ValueError(f"{path}: GGUF key {key!r} missing")
        return default

    arch = get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not 'llama'")
    sd, rope_freqs = {}, None
    for name, (ttype, shape, raw) in tensors.items():
        try:
            t = _decode(ttype, shape, raw, g)
        except ValueError as e:
            raise ValueError(f"{path}: tensor {name}: {e}") from None
        if name == ROPE_FREQS:
            rope_freqs = t.float()
            continue
        try:
            sd[rename(name, GGUF_TO_META)] = t
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a llama GGUF") from None
    if "tok_embeddings.weight" not in sd:
        raise ValueError(f"{path}: no token_embd.weight tensor (a vocabulary-only GGUF?)")
    try:  # the size limits are checked from the metadata alone (ModelArgs.__post_init__)
        args = ModelArgs(
            dim=get("llama.embedding_length"), n_layers=get("llama.block_count"),
            n_heads=get("llama.attention.head_count"), n_kv_heads=get("llama.attention.head_count_kv", 0) or None,
            vocab_size=int(sd["tok_embeddings.weight"].shape[0]), hidden_dim=get("llama.feed_forward_length"),
            # float32 in the file: 1e-5 comes back as 9.99999974e-06; 7 significant digits undo that
            norm_eps=float(f'{get("llama.attention.layer_norm_rms_epsilon"):.7g}'),
            rope_theta=float(f'{get("llama.rope.freq_base", 10000.0):.7g}'),
            max_seq_len=get("llama.context_length", 2048))
    except ValueError as e:  # (a missing key already names the file)
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    if rope_freqs is not None:
        args.use_scaled_rope = True
        for name in ("scale_factor", "low_freq_factor", "high_freq_factor", "original_context"):
            value = get(OUR_KEYS + name, getattr(args, "rope_" + name))  # Meta's 3.1 values by default
            setattr(args, "rope_" + name, int(value) if name == "original_context" else value)
        base = rope_frequencies(ModelArgs(**{**args.to_params_json(), "use_scaled_rope": False}))
        if not torch.allclose(base / rope_frequencies(args), rope_freqs, rtol=1e-4):
            raise ValueError(f"{path}: rope_freqs does not match Llama 3.1's rope scaling; not supported")
    return args, sd


def gguf_tokenizer(path: Path):
    """The Tokenizer of a GGUF file without reading its tensor data: Tokenizer(path) reads the
    whole file (S bytes, twice over), so hand it a vocabulary-only copy of the header instead
    (magic, version, zero tensors, the key/value section)."""
    import struct
    import tempfile

    from ..tokenizer import Tokenizer

    _, _, kv_end = read_gguf(path)
    with open(path, "rb") as f:
        header = f.read(kv_end)
    version, _, n_kv = struct.unpack_from("<IQQ", header, 4)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = Path(tmp) / Path(path).name
        vocab.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, n_kv) + header[24:])
        tokenizer = Tokenizer(vocab)
    tokenizer.path = Path(path)
    return tokenizer
