"""GGUF, llama.cpp's single-file format: the header, the names, and writing.

A GGUF file is a key/value header (architecture hyper-parameters under `llama.*`, the
vocabulary under `tokenizer.ggml.*`) followed by aligned tensor data (the layout: ggml's
docs/gguf.md). Tensor names are llama.cpp's (`blk.N.attn_q.weight`, ...), and their layout is
Meta's: llama.cpp's LLaMA uses the interleaved rotary pairs (its convert_hf_to_gguf.py permutes
HF's q/k rows back to Meta's order), so no permutation is needed here. GGUF lists dims
innermost-first; the package reverses them for us. A file without `output.weight` ties the head
to `token_embd.weight` (llama.cpp's llama-model.cpp falls back to it; Llama 3.2 ships that way).

Types written (gguf.quants.quantize): F32, F16, BF16 and the 32-weight block types Q8_0, Q5_1,
Q5_0, Q4_1, Q4_0 (blocks of ggml-common.h: e.g. Q8_0 is w ~ d * q, q int8, one fp16 d per 32
weights). Reading the tensors (as a float state dict, or into our kernels one tensor at a time):
gguf_load.py.
"""

from __future__ import annotations

import mmap
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from sentencepiece import sentencepiece_model_pb2 as pb

from ..core.config import ModelArgs
from ..core.gguf_file import read_gguf
from ..core.layout import GGUF_TO_META, META_TO_GGUF, rename
from ..core.model import rope_frequencies
from ..core.tokenizer import (GGUF_BYTE, GGUF_CONTROL, GGUF_NORMAL, GGUF_UNKNOWN, GGUF_UNUSED, Tokenizer,
                              _gpt2_bytes_to_unicode)
from .hf import tiktoken_merges

# Meta name -> GGUF name, "{}" the layer index (llama.cpp's tensor map for LLM_ARCH_LLAMA).
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency divisors, as llama.cpp's converter writes them
OUR_KEYS = "annotated_llama.rope."  # the 3.1 scaling parameters themselves (llama.cpp ignores these keys)


def _gguf():
    import gguf  # here: ~150 ms to import (yaml), which loading any other format would pay for nothing

    return gguf


def file_types():
    """--dtype name -> (GGML type of the matrices, general.file_type)."""
    g = _gguf()
    T, F = g.GGMLQuantizationType, g.LlamaFileType
    return {"f32": (T.F32, F.ALL_F32), "f16": (T.F16, F.MOSTLY_F16), "bf16": (T.BF16, F.MOSTLY_BF16),
            "q8_0": (T.Q8_0, F.MOSTLY_Q8_0), "q5_1": (T.Q5_1, F.MOSTLY_Q5_1), "q5_0": (T.Q5_0, F.MOSTLY_Q5_0),
            "q4_1": (T.Q4_1, F.MOSTLY_Q4_1), "q4_0": (T.Q4_0, F.MOSTLY_Q4_0)}


FLOAT_TYPES = ("F32", "F16", "BF16")


# ---- writing ---------------------------------------------------------------------------------

def _encode(t: torch.Tensor, qtype, g, head: bool = False) -> tuple[np.ndarray, object]:
    """(array for GGUFWriter.add_tensor, its GGML type). 1-D tensors (norms, rope factors) stay
    F32, as llama.cpp's converter keeps them. The head (the output matrix, or a tied embedding)
    of a 4- or 5-bit file is Q8_0: llama.cpp's quantizer keeps it at 6 bits (Q6_K, which the
    gguf package cannot write). A row the block size does not divide falls back to F16, as
    llama.cpp's quantizer does."""
    T = g.GGMLQuantizationType
    if t.dim() == 1 or qtype == T.F32:
        return t.float().numpy(), T.F32
    if qtype == T.F16:
        return t.to(torch.float16).numpy(), T.F16
    if qtype == T.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), T.BF16
    if head:
        qtype = T.Q8_0
    if t.shape[-1] % g.GGML_QUANT_SIZES[qtype][0]:
        return t.to(torch.float16).numpy(), T.F16
    return g.quants.quantize(t.float().numpy(), qtype), qtype


def _add_tokenizer(w, tokenizer, g) -> None:
    if tokenizer.kind == "sentencepiece":
        sp = tokenizer.sp
        n = sp.get_piece_size()
        tokens = [sp.id_to_piece(i) for i in range(n)]
        scores = [sp.get_score(i) for i in range(n)]
        types = [GGUF_CONTROL if sp.is_control(i) else GGUF_UNKNOWN if sp.is_unknown(i) else GGUF_BYTE
                 if sp.is_byte(i) else GGUF_UNUSED if sp.is_unused(i) else GGUF_NORMAL for i in range(n)]
        proto = pb.ModelProto.FromString(sp.serialized_model_proto())
        w.add_tokenizer_model("llama")  # SentencePiece BPE with scores
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(sp.unk_id())
        w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    else:
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


def save_gguf(path: Path, args: ModelArgs, sd: dict[str, torch.Tensor | tuple[np.ndarray, object]], tokenizer,
              dtype=None) -> None:
    """Write a GGUF file llama.cpp runs as is. dtype: a key of file_types() (None: the
    model's own 16-bit type, else f32). A tied model writes no output.weight.

    A value of `sd` may instead be a tensor already in a GGML type, (array, GGMLQuantizationType),
    written as it is: a block type's raw bytes (uint8, a row of bytes per matrix row, as
    gguf.quants.quantize returns them) or a plain array of a float or integer type. A file then
    mixes types as llama.cpp's quantizer makes them, K- and IQ-types included."""
    g = _gguf()
    if tokenizer is None:
        raise ValueError(f"{path}: GGUF embeds the vocabulary; a tokenizer is needed")
    emb = sd["tok_embeddings.weight"]
    stored = emb.dtype if isinstance(emb, torch.Tensor) else torch.float32
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
    tied = args.tie_word_embeddings
    if tied:
        tensors.pop("output.weight", None)
    for name, t in tensors.items():
        head = name == "output.weight" or (tied and name == "tok_embeddings.weight")
        array, ttype = t if isinstance(t, tuple) else _encode(t.detach().cpu(), qtype, g, head)
        w.add_tensor(name if name == ROPE_FREQS else rename(name, META_TO_GGUF), array, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- reading: the header (core/gguf_file.py) and tensor table; the tensors: gguf_load.py -----

def release_pages(raw: np.ndarray, whole_file: bool = False) -> None:
    """Drop the mapped file pages under `raw` (a view read_gguf made), or under the whole file,
    from this process's resident memory: they stay in the page cache, and a later read maps them
    again. Only while loading, when no mapped byte has been written (madvise(MADV_DONTNEED) on a
    private mapping would discard written pages)."""
    view = raw
    while not isinstance(view, memoryview):  # slices of np.frombuffer(mm), itself a view of a memoryview
        view = view.base
    mm = view.obj
    if whole_file:
        mm.madvise(mmap.MADV_DONTNEED)
        return
    start = raw.ctypes.data - np.frombuffer(mm, np.uint8, 1).ctypes.data
    a = start // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, a, min(start + raw.nbytes, len(mm)) - a)


def float_tensor(ttype, shape, raw: np.ndarray, g) -> torch.Tensor:
    """An F32/F16/BF16 tensor as a zero-copy view of the mapped bytes."""
    T = g.GGMLQuantizationType
    if ttype == T.F32:
        return torch.from_numpy(raw.view(np.float32).reshape(shape))
    if ttype == T.F16:
        return torch.from_numpy(raw.view(np.float16).reshape(shape))
    return torch.from_numpy(raw.view(np.int16).reshape(shape)).view(torch.bfloat16)


def open_gguf(path: Path):
    """(ModelArgs, {Meta name: (ggml type, shape, raw bytes)}, rope_freqs or None) of a llama
    GGUF, every bad file a one-line ValueError naming it. A file without output.weight is tied."""
    g = _gguf()
    try:
        meta, tensors, _ = read_gguf(path)
    except (ValueError, OSError, UnicodeDecodeError, struct.error) as e:
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
    raw, rope_freqs = {}, None
    for name, entry in tensors.items():
        if name == ROPE_FREQS:
            if entry[0].name not in FLOAT_TYPES:
                raise ValueError(f"{path}: tensor {name} is {entry[0].name}, not a float type")
            rope_freqs = float_tensor(*entry, g).float()
            continue
        try:
            raw[rename(name, GGUF_TO_META)] = entry
        except KeyError:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a llama GGUF") from None
    if "tok_embeddings.weight" not in raw:
        raise ValueError(f"{path}: no token_embd.weight tensor (a vocabulary-only GGUF?)")
    try:  # the size limits are checked from the metadata alone (ModelArgs.__post_init__)
        args = ModelArgs(
            dim=get("llama.embedding_length"), n_layers=get("llama.block_count"),
            n_heads=get("llama.attention.head_count"), n_kv_heads=get("llama.attention.head_count_kv", 0) or None,
            vocab_size=int(raw["tok_embeddings.weight"][1][0]), hidden_dim=get("llama.feed_forward_length"),
            # float32 in the file: 1e-5 comes back as 9.99999974e-06; 7 significant digits undo that
            norm_eps=float(f'{get("llama.attention.layer_norm_rms_epsilon"):.7g}'),
            rope_theta=float(f'{get("llama.rope.freq_base", 10000.0):.7g}'),
            max_seq_len=get("llama.context_length", 2048), tie_word_embeddings="output.weight" not in raw)
    except ValueError as e:  # (a missing key already names the file)
        raise ValueError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    # the metadata against the tensors, from their shapes: before anything is built or read
    args.check_checkpoint({name: tuple(entry[1]) for name, entry in raw.items()}, path, f"{path.name}'s metadata")
    if rope_freqs is not None:
        args.use_scaled_rope = True
        for name in ("scale_factor", "low_freq_factor", "high_freq_factor", "original_context"):
            value = get(OUR_KEYS + name, getattr(args, "rope_" + name))  # Meta's 3.1 values by default
            setattr(args, "rope_" + name, int(value) if name == "original_context" else value)
        base = rope_frequencies(ModelArgs(**{**args.to_params_json(), "use_scaled_rope": False}))
        if not torch.allclose(base / rope_frequencies(args), rope_freqs, rtol=1e-4):
            raise ValueError(f"{path}: rope_freqs does not match Llama 3.1's rope scaling; not supported")
    return args, raw, rope_freqs


def is_quantized(path: Path) -> bool:
    """Whether a GGUF file holds any quantized (not F32/F16/BF16) tensor."""
    return any(t[0].name not in FLOAT_TYPES for t in open_gguf(path)[1].values())


def gguf_tokenizer(path: Path):
    """The Tokenizer of a GGUF file without reading its tensor data: Tokenizer(path) reads the
    whole file (S bytes, twice over), so hand it a vocabulary-only copy of the header instead
    (magic, version, zero tensors, the key/value section)."""
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
