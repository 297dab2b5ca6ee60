"""`annotated-llama info PATH [--json]`: what a checkpoint is, from its metadata and tensor headers
alone, on one screen (as llama.cpp's model loader prints it): the layout, the architecture and the
preset it matches, the parameter count, tensor types, context and rope settings, the tokenizer, the
chat template, the generation defaults, and the memory it needs at each precision.

No weight is read: safetensors files are read up to the end of their JSON header, .pth files are
memory-mapped (torch.load(mmap=True) touches only the pickled index), GGUF files are mapped and
only their header is parsed.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

KV_TOKENS = 1024  # the KV cache is reported per 1k tokens


def add_arguments(p):
    p.add_argument("path", help="checkpoint dir (Hub snapshot, HF, Meta, ours) or .gguf file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")


def run(args):
    info = describe(Path(args.path))
    print(json.dumps(info, indent=2) if args.json else summary(info))


# ---- reading headers ------------------------------------------------------------------------------

def safetensors_header(path: Path) -> tuple[dict[str, tuple[str, list[int]]], dict]:
    """({name: (dtype, shape)}, metadata) from a .safetensors file's header: a little-endian u64
    length, then that many bytes of JSON (the safetensors format); the tensor data is not read."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such safetensors file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a valid safetensors file (the header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    try:
        return {k: (v["dtype"], list(v["shape"])) for k, v in header.items()}, meta
    except (KeyError, TypeError):
        raise ValueError(f"{path}: not a valid safetensors file (a tensor entry lacks dtype or shape)") from None


def _pth_tensors(path: Path) -> dict:
    from ..core.tensor_files import load_pth  # weights_only=True, mmap=True: shapes without the data
    return load_pth(path)


def _hf_files(path: Path) -> list[Path]:
    from ..weights.hf import HF_INDEX, HF_WEIGHTS
    if (path / HF_WEIGHTS).is_file():
        return [path / HF_WEIGHTS]
    index = path / HF_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{index}: not a weights index (expected a 'weight_map' object)") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise ValueError(f"{path}: config.json but no weights (expected model.safetensors or {HF_INDEX})")


def _tensors(files: list[Path]) -> tuple[Counter, int, dict]:
    """(count per stored type, bytes on disk, {name: shape})."""
    types, shapes = Counter(), {}
    for f in files:
        if f.suffix == ".safetensors":
            header, _ = safetensors_header(f)
            for name, (dtype, shape) in header.items():
                types[dtype] += 1
                shapes[name] = shape
        else:
            for name, t in _pth_tensors(f).items():
                types[str(t.dtype).removeprefix("torch.")] += 1
                shapes[name] = list(t.shape)
    return types, sum(f.stat().st_size for f in files), shapes


# ---- one description per layout ------------------------------------------------------------------

def describe(path: Path) -> dict:
    """Everything `info` prints, as plain data (the --json output)."""
    from ..weights import OURS_WEIGHTS, detect_format, meta_dir

    fmt = detect_format(path)
    if fmt == "gguf":
        return _describe_gguf(path)
    from ..core.config import ModelArgs
    from ..core.tokenizer import Tokenizer, default_tokenizer_path

    where = meta_dir(path) if fmt == "meta" else path
    tok_path = default_tokenizer_path(where, parent=fmt != "hf")
    tokenizer = Tokenizer(tok_path) if tok_path is not None else None
    quantized = None
    if fmt == "hf":
        config_file = path / "config.json"
        try:
            args = ModelArgs.from_hf_config(json.loads(config_file.read_text()))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{config_file}: missing or invalid field {e}") from None
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None
        files = _hf_files(path)
        snapshot = (path / "original" / "params.json").is_file() or path.parent.name == "snapshots"
        also = " (Meta's files also under original/)" if (path / "original").is_dir() else ""
        layout = f"HF, a Hub snapshot{also}" if snapshot else "HF (config.json + safetensors)"
    elif fmt == "meta":
        from ..weights.meta import llama32_rope_factor, shard_paths
        config_file = where / "params.json"
        args = ModelArgs.from_params_json(config_file)
        files = shard_paths(where)
        first = _pth_tensors(files[0])
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words if tokenizer else first["tok_embeddings.weight"].shape[0]
        out, emb = first.get("output.weight"), first.get("tok_embeddings.weight")
        if out is not None and emb is not None and out.shape == emb.shape and bool((out[:1] == emb[:1]).all()):
            args.tie_word_embeddings = True  # Meta stores a tied head as a copy (the first row decides here)
        llama32_rope_factor(args, config_file)
        layout = f"Meta (params.json + {len(files)} consolidated.NN.pth" + (", under original/ of a Hub snapshot)"
                                                                             if where != path else ")")
    else:
        config_file = path / "params.json"
        args = ModelArgs.from_params_json(config_file)
        files = [path / OURS_WEIGHTS]
        header, meta = safetensors_header(files[0])
        if args.vocab_size == -1:
            args.vocab_size = tokenizer.n_words if tokenizer else header["tok_embeddings.weight"][1][0]
        quantized = meta.get("quantization")
        layout = "ours (params.json + model.safetensors" + (f", {quantized} weights)" if quantized else ")")
    types, size, _ = _tensors(files)
    return _assemble(path, layout, args, dict(types), size, len(files), tokenizer)


def _describe_gguf(path: Path) -> dict:
    from ..core.config import ModelArgs
    from ..core.tokenizer import Tokenizer
    from ..weights.gguf import read_gguf

    try:
        meta, tensors, _ = read_gguf(path)
    except (ValueError, OSError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from None
    if not tensors:
        raise ValueError(f"{path}: a vocabulary-only GGUF (no tensors)")
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: GGUF architecture {meta.get('general.architecture')!r} is not 'llama'")
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise ValueError(f"{path}: no token_embd.weight tensor")

    def key(name, default=None):
        value = meta.get(f"llama.{name}", default)
        if value is None:
            raise ValueError(f"{path}: GGUF key 'llama.{name}' missing")
        return value

    # the llama.* keys llama.cpp's converter writes (gguf-py constants); float32 values rounded back
    args = ModelArgs(dim=key("embedding_length"), n_layers=key("block_count"), n_heads=key("attention.head_count"),
                     n_kv_heads=key("attention.head_count_kv", 0) or None, vocab_size=int(emb[1][0]),
                     hidden_dim=key("feed_forward_length"), max_seq_len=key("context_length", 2048),
                     norm_eps=float(f'{key("attention.layer_norm_rms_epsilon"):.7g}'),
                     rope_theta=float(f'{key("rope.freq_base", 10000.0):.7g}'),
                     use_scaled_rope="rope_freqs.weight" in tensors,
                     tie_word_embeddings="output.weight" not in tensors)
    types = Counter(t[0].name for t in tensors.values())
    layout = "GGUF" + (f" ({meta['general.name']})" if isinstance(meta.get("general.name"), str) else "")
    return _assemble(path, layout, args, dict(types), path.stat().st_size, 1, Tokenizer(path))


def _assemble(path, layout, args, types, size, n_files, tokenizer) -> dict:
    from ..core.chat_format import default_template

    kv = 2 * args.n_layers * args.n_kv_heads * args.head_dim * KV_TOKENS  # K and V values per 1k tokens
    rope = {"theta": args.rope_theta, "scaling": None}
    if args.use_scaled_rope:
        rope["scaling"] = {"type": "llama3", "factor": args.rope_scale_factor,
                           "low_freq_factor": args.rope_low_freq_factor, "high_freq_factor": args.rope_high_freq_factor,
                           "original_context": args.rope_original_context}
    out = {
        "path": str(path), "format": layout,
        "architecture": {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                         "n_kv_heads": args.n_kv_heads, "head_dim": args.head_dim,
                         "ffn_hidden_dim": args.ffn_hidden_dim,
                         "vocab_size": args.vocab_size, "norm_eps": args.norm_eps,
                         "tie_word_embeddings": args.tie_word_embeddings},
        "preset": matching_presets(args), "parameters": args.num_params(),
        "tensors": dict(sorted(types.items())), "file_bytes": size, "files": n_files,
        "context_length": args.max_seq_len, "rope": rope,
        "memory": {"weights_bytes": weight_bytes(args),
                   "kv_cache_bytes_per_1k_tokens": {"bf16": 2 * kv, "f32": 4 * kv}},
        "tokenizer": None, "chat_template": None, "generation_defaults": {},
    }
    if tokenizer is not None:
        out["tokenizer"] = {"file": str(tokenizer.path), "kind": tokenizer.kind, "n_words": tokenizer.n_words,
                            "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id,
                            "stop_ids": sorted(tokenizer.stop_ids)}
        first = next((ln.strip() for ln in (tokenizer.chat_template or "").splitlines() if ln.strip()), "")
        out["chat_template"] = {"name": default_template(tokenizer),
                                "first_line": first[:100] if tokenizer.chat_template else None}
        out["generation_defaults"] = tokenizer.generation_defaults
    return out


def matching_presets(args) -> list[str]:
    """The presets with this architecture (context length only breaks ties)."""
    from ..core.config import PRESETS, ModelArgs

    def shape(a):
        return (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.ffn_hidden_dim, a.norm_eps, a.rope_theta,
                a.use_scaled_rope, a.use_scaled_rope and a.rope_scale_factor, a.tie_word_embeddings)

    same = [n for n, p in PRESETS.items() if shape(ModelArgs(**p)) == shape(args)]
    exact = [n for n in same if PRESETS[n].get("max_seq_len", 2048) == args.max_seq_len]
    return exact or same


def weight_bytes(args) -> dict[str, int]:
    """Bytes of weights at each precision. int8/int4 as quantize.py stores them: the linear layers
    (and an untied output head) as int8 with a float32 scale per row, or int4 with a float32
    scale and minimum per group of 128 inputs; the embedding and norms stay bf16."""
    n = args.num_params()
    C, V = args.dim, args.vocab_size
    embedding_and_norms = V * C + (2 * args.n_layers + 1) * C
    linear = n - embedding_and_norms
    rows = n_rows(args)
    return {"f32": 4 * n, "bf16": 2 * n,
            "int8": linear + 4 * rows + 2 * embedding_and_norms,
            "int4": linear // 2 + 8 * (linear // 128) + 2 * embedding_and_norms}


def n_rows(args) -> int:
    kv = args.n_kv_heads * args.head_dim
    per_layer = args.dim * 2 + kv * 2 + args.ffn_hidden_dim * 2 + args.dim  # wq wo, wk wv, w1 w3, w2 outputs
    return args.n_layers * per_layer + (0 if args.tie_word_embeddings else args.vocab_size)


# ---- the one-screen summary -----------------------------------------------------------------------

def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def summary(info: dict) -> str:
    a = info["architecture"]
    group = a["n_heads"] // a["n_kv_heads"]
    attention = f"{a['n_heads']} heads" + (f" ({a['n_kv_heads']} kv, GQA {group}:1)" if group > 1 else "")
    rope = info["rope"]
    scaling = rope["scaling"]
    rope_text = f"theta {rope['theta']:g}" + (
        f", llama3 scaling x{scaling['factor']:g} (low {scaling['low_freq_factor']:g}, high "
        f"{scaling['high_freq_factor']:g}, original context {scaling['original_context']:,})" if scaling else "")
    mem = info["memory"]["weights_bytes"]
    kv = info["memory"]["kv_cache_bytes_per_1k_tokens"]
    n = info["parameters"]
    lines = [
        ("model", info["path"]),
        ("format", info["format"]),
        ("architecture", f"llama: {a['n_layers']} layers, dim {a['dim']}, {attention}, head_dim {a['head_dim']}, "
                         f"ffn {a['ffn_hidden_dim']}, vocab {a['vocab_size']:,}"
                         + (", tied embeddings" if a["tie_word_embeddings"] else "")),
        ("preset", " or ".join(info["preset"]) or "none"),
        ("parameters", f"{n:,} ({n / 1e9:.2f} B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.1f} M)"),
        ("tensors", ", ".join(f"{c} x {t}" for t, c in info["tensors"].items())
         + f" ({_size(info['file_bytes'])} in {info['files']} file{'s' if info['files'] > 1 else ''})"),
        ("context", f"{info['context_length']:,} tokens"),
        ("rope", rope_text),
        ("norm eps", f"{a['norm_eps']:g}"),
    ]
    tok = info["tokenizer"]
    if tok is None:
        lines.append(("tokenizer", "none found beside the weights"))
    else:
        lines.append(("tokenizer", f"{Path(tok['file']).name} ({tok['kind']}, {tok['n_words']:,} ids); "
                                   f"bos {tok['bos_id']}, eos {tok['eos_id']}, "
                                   f"stops {' '.join(map(str, tok['stop_ids']))}"))
        chat = info["chat_template"]
        lines.append(("chat template", f"the model's own: {chat['first_line']}" if chat["first_line"] is not None
                      else f"none stored; built-in default {chat['name']}"))
        defaults = info["generation_defaults"]
        lines.append(("generation", ", ".join(f"{k} {v}" for k, v in defaults.items()) or "no defaults stored"))
    lines.append(("memory", "weights " + " | ".join(f"{k} {_size(v)}" for k, v in mem.items())))
    lines.append(("", f"KV cache {_size(kv['bf16'])} per 1k tokens (bf16), {_size(kv['f32'])} (f32)"))
    return "\n".join(f"{k:13} {v}" for k, v in lines)
