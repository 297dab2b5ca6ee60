"""Model architecture: the `ModelArgs` dataclass, the named presets, and the mappings
to and from Meta's `params.json` and HF's `config.json`.

Shape letters used across the package (declared once here, used in every shape comment):
    B batch, T new tokens in this call, S cached length (keys/values), H query heads,
    K key/value heads (GQA), D head_dim, C model dim (`dim`), F FFN hidden dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class ModelArgs:
    # Meta's field names and defaults (llama/model.py ModelArgs).
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = -1  # -1: taken from the tokenizer when the model is loaded (Meta's params.json)
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    use_scaled_rope: bool = False
    max_seq_len: int = 2048
    max_batch_size: int = 32
    # Beyond Meta's fields. An explicit FFN width, for HF configs whose intermediate_size
    # no (multiple_of, ffn_dim_multiplier) pair reproduces (llama2.c keeps the same field).
    hidden_dim: Optional[int] = None
    # Llama 3.1 rope scaling (llama-models `apply_scaling`); Llama 3.2 uses factor 32.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    # Llama 3.2 1B/3B share the output head with the input embedding (HF `tie_word_embeddings`):
    # `output.weight` is `tok_embeddings.weight`, one V x C matrix instead of two.
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        for name in ("vocab_size", "hidden_dim", "rope_original_context"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"ModelArgs.{name} must be an integer, got {value!r}")
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier", "rope_scale_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"ModelArgs.{name} must be a positive finite number, got {value!r}")
        # Sizes first, each from the config alone: a layer count of 10**9 must fail here, before
        # anything (even a shapes-only skeleton on the meta device) is built from it.
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and value > limit:
                raise ValueError(f"ModelArgs.{name}={value:,} is beyond the limit of {limit:,} (the largest "
                                 f"released Llama has {LARGEST_LLAMA[name]:,}); this config describes "
                                 f"{self.size_summary()}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.vocab_size != -1 and self.vocab_size < 1:
            raise ValueError(f"ModelArgs.vocab_size must be positive or -1, got {self.vocab_size}")
        if self.norm_eps >= 1:
            raise ValueError(f"ModelArgs.norm_eps must be below 1, got {self.norm_eps}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"ModelArgs.hidden_dim must be positive, got {self.hidden_dim}")
        if self.ffn_hidden_dim > LIMITS["hidden_dim"]:
            raise ValueError(f"ModelArgs: the FFN width {self.ffn_hidden_dim:,} (from dim and ffn_dim_multiplier) is "
                             f"beyond the limit of {LIMITS['hidden_dim']:,}")
        if self.num_params() > MAX_PARAMS or self.max_seq_len * self.head_dim > MAX_ROPE_ENTRIES:
            raise ValueError(f"ModelArgs: this configuration describes {self.size_summary()}; more than any "
                             f"machine holds (limits: {MAX_PARAMS:.0e} parameters, max_seq_len * head_dim "
                             f"{MAX_ROPE_ENTRIES:,})")

    def size_summary(self) -> str:
        """'6.9M parameters (28 MB in float32, 14 MB in bfloat16)', the memory estimate of errors."""
        n = self.num_params()
        return f"{_count(n)} parameters ({_bytes(4 * n)} in float32, {_bytes(2 * n)} in bfloat16)"

    def check_checkpoint(self, shapes: dict, weights_file, config_file) -> None:
        """The tensors a loader is about to adopt (name -> shape, Meta's names) against this
        config, from the names and shapes alone: the layer count and the embedding. A config
        that describes another (say a far larger) model than the file holds is refused here,
        with both sizes, before a skeleton of it is built."""
        layers = {int(k.split(".")[1]) for k in shapes if k.startswith("layers.") and k.split(".")[1].isdigit()}
        emb = shapes.get("tok_embeddings.weight")
        stored = sum(math.prod(s) for s in shapes.values())
        if layers != set(range(self.n_layers)):
            gaps = "" if len(layers) == max(layers, default=-1) + 1 else ", numbered with gaps"
            raise ValueError(f"{config_file} describes {self.n_layers} layers ({self.size_summary()}) but "
                             f"{weights_file} holds {len(layers)} layers{gaps} ({_count(stored)} parameters)")
        expected = (self.vocab_size, self.dim)
        if emb is not None and self.vocab_size > 0 and tuple(emb) != expected:
            raise ValueError(f"{config_file} implies tok_embeddings.weight {expected} ({self.size_summary()}) but "
                             f"{weights_file} holds {tuple(emb)} ({_count(stored)} parameters)")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's FeedForward: 2/3 of 4*dim (SwiGLU keeps the parameter count of a 4x ReLU FFN,
        # Shazeer 2020), optionally scaled, then rounded up to a multiple of `multiple_of`.
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        """Parameter count (embedding and output head included; a tied head counts once)."""
        C, F, V, L = self.dim, self.ffn_hidden_dim, self.vocab_size, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        per_layer = C * C * 2 + C * kv * 2 + 3 * C * F + 2 * C
        return V * C * (1 if self.tie_word_embeddings else 2) + L * per_layer + C

    # ---- constructors ----------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            known = ", ".join(sorted(PRESETS))
            raise ValueError(f"unknown model preset {name!r}; known presets: {known}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_params_json(cls, path, **overrides) -> "ModelArgs":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such params.json") from None
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of 5,000 digits
            raise ValueError(f"{path}: not valid JSON ({str(e)[:200]})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a JSON object of model parameters")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Meta's files carry nothing else, but tolerate extras written by other tools.
        kwargs = {k: v for k, v in raw.items() if k in fields}
        try:
            return cls(**{**kwargs, **overrides})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def to_params_json(self) -> dict:
        """Meta's params.json fields (ours beyond Meta's only when they matter)."""
        out = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads, "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of, "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            "use_scaled_rope": self.use_scaled_rope, "max_seq_len": self.max_seq_len,
        }
        if self.hidden_dim is not None:
            out["hidden_dim"] = self.hidden_dim
        if self.use_scaled_rope:
            out.update(rope_scale_factor=self.rope_scale_factor, rope_low_freq_factor=self.rope_low_freq_factor,
                       rope_high_freq_factor=self.rope_high_freq_factor,
                       rope_original_context=self.rope_original_context)
        if self.tie_word_embeddings:  # Meta's params.json has no such field: its files store a copy
            out["tie_word_embeddings"] = True
        return out

    @classmethod
    def from_hf_config(cls, config: dict, **overrides) -> "ModelArgs":
        """From a transformers LlamaConfig dict (`config.json`)."""
        if config.get("model_type", "llama") != "llama":
            raise ValueError(f"config.json: model_type {config.get('model_type')!r} is not 'llama'")
        kwargs = dict(
            dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
            vocab_size=config["vocab_size"], hidden_dim=config["intermediate_size"],
            norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=config.get("rope_theta", 10000.0),
            max_seq_len=config.get("max_position_embeddings", 2048),
            # LlamaConfig's default is False; Llama 3.2 1B/3B set it (lm_head.weight is then absent)
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        # transformers >= 5 keeps rope_theta inside rope_parameters
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            kwargs.update(use_scaled_rope=True, rope_scale_factor=rope["factor"],
                          rope_low_freq_factor=rope["low_freq_factor"],
                          rope_high_freq_factor=rope["high_freq_factor"],
                          rope_original_context=rope["original_max_position_embeddings"])
        elif rope_type != "default":
            raise ValueError(f"config.json: rope scaling type {rope_type!r} is not supported")
        if "head_dim" in config and config["head_dim"] not in (None, kwargs["dim"] // kwargs["n_heads"]):
            raise ValueError("config.json: head_dim differs from hidden_size / num_attention_heads")
        # Keep Meta's derivation when it reproduces the width, so params.json stays Meta-shaped.
        args = cls(**{**kwargs, **overrides})
        derived = dataclasses.replace(args, hidden_dim=None)
        if derived.ffn_hidden_dim == args.hidden_dim:
            args = derived
        return args

    def to_hf_config(self, bos_token_id: int = 1, eos_token_id=2, torch_dtype: str = "float32") -> dict:
        """transformers' LlamaConfig fields, spelled as the Hub's config.json files spell them."""
        scaling = None
        if self.use_scaled_rope:  # the published rope_scaling dict (meta-llama/Llama-3.1-8B config.json)
            scaling = {"factor": self.rope_scale_factor, "high_freq_factor": self.rope_high_freq_factor,
                       "low_freq_factor": self.rope_low_freq_factor,
                       "original_max_position_embeddings": self.rope_original_context, "rope_type": "llama3"}
        rope = {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.dim, "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            # both spellings: transformers 4.x reads rope_scaling, 5.x rope_parameters
            "rope_scaling": scaling, "rope_parameters": rope,
            "hidden_act": "silu", "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pretraining_tp": 1,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": torch_dtype,
        }


# ---- presets --------------------------------------------------------------------------
# Real sizes from the params.json files of Meta's releases (as HF's convert_llama_weights_to_hf.py
# and llama.cpp's converters reproduce them) and the config.json files on the Hugging Face Hub;
# vocab_size as shipped with each tokenizer. tests/core/test_config.py checks each released preset's
# parameter count and config.json against the published ones. Tiny presets are for tests and
# documentation on a CPU.
PRESETS: dict[str, dict] = {
    # LLaMA 1 (Touvron et al. 2023, Table 2); 7B/13B/33B use norm_eps 1e-6
    "llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, norm_eps=1e-6),
    "llama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, norm_eps=1e-6),
    "llama-33b": dict(dim=6656, n_layers=60, n_heads=52, vocab_size=32000, norm_eps=1e-6),
    "llama-65b": dict(dim=8192, n_layers=80, n_heads=64, vocab_size=32000, norm_eps=1e-5),
    # Llama 2 (trained at 4096 tokens; GQA for 70B)
    "llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, max_seq_len=4096),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, max_seq_len=4096),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                        multiple_of=4096, ffn_dim_multiplier=1.3, max_seq_len=4096),
    # Code Llama (Roziere et al. 2023, section 2.4: rope_theta 1e6 for 16k-token training). 7B and 13B
    # add 16 infilling tokens to Llama 2's vocabulary (32,016); 34B has none, and uses GQA.
    "code-llama-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
    "code-llama-13b": dict(dim=5120, n_layers=40, n_heads=40, vocab_size=32016, rope_theta=1e6, max_seq_len=16384),
    "code-llama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=32000, rope_theta=1e6,
                           max_seq_len=16384),
    # Llama 3 / 3.1 8B (tiktoken vocabulary of 128,256 ids)
    "llama-3-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                       multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0, max_seq_len=8192),
    "llama-3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         multiple_of=1024, ffn_dim_multiplier=1.3, rope_theta=500000.0,
                         use_scaled_rope=True, max_seq_len=131072),
    # Llama 3.2 1B/3B: pruned and distilled from 3.1 8B, one matrix for embedding and output,
    # rope scaling factor 32 (meta-llama/Llama-3.2-1B and -3B config.json).
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256,
                         ffn_dim_multiplier=1.5, rope_theta=500000.0, use_scaled_rope=True,
                         rope_scale_factor=32.0, max_seq_len=131072, tie_word_embeddings=True),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256,
                         ffn_dim_multiplier=1.0, rope_theta=500000.0, use_scaled_rope=True,
                         rope_scale_factor=32.0, max_seq_len=131072, tie_word_embeddings=True),
    # Llama 3.3 70B: Llama 3.1 70B's shape (meta-llama/Llama-3.3-70B-Instruct config.json)
    "llama-3.3-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=128256,
                          multiple_of=4096, ffn_dim_multiplier=1.3, rope_theta=500000.0,
                          use_scaled_rope=True, max_seq_len=131072),
    # TinyLlama 1.1B (Zhang et al. 2024): Llama 2's vocabulary, 22 layers, 4 kv heads
    # (TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json)
    "tinyllama-1.1b": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, max_seq_len=2048),
    # Tiny shapes for tests and docs (random weights, milliseconds per forward).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=512, multiple_of=32, max_seq_len=256),
    "tiny-gqa": dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=256),
    "tiny-llama3": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=48,
                        ffn_dim_multiplier=1.3, rope_theta=500000.0, use_scaled_rope=True,
                        rope_original_context=64, max_seq_len=512),
    # llama2.c's stories15M shape (Karpathy's TinyStories models), a common CPU yardstick.
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256),
    # The 134M shape of bench/bench_engines.py's speed comparisons (bench/RESULTS.md).
    "bench-134m": dict(dim=768, n_layers=12, n_heads=12, vocab_size=32000, hidden_dim=2048, max_seq_len=1024),
    # Ours: the embedded default model (annotated_llama/default_model), trained on the World
    # English Bible with a 4,096-piece tokenizer by scripts/train_default_model.sh (6.9M params).
    "bible-7m": dict(dim=256, n_layers=6, n_heads=8, vocab_size=4096, multiple_of=32, max_seq_len=256),
}


# ---- size limits ------------------------------------------------------------------------
# Checked from the config alone, before any loader builds or reads anything from it. Far above
# every released Llama (the largest, Llama 3.1 405B's params.json: dim 16384, 126 layers,
# 128 heads, FFN 53248, 131072 positions; LLaMA 65B's 64 kv heads; Llama 3's vocabulary 128256), far below
# sizes whose mere skeleton exhausts memory.
LIMITS = {"dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10, "multiple_of": 1 << 16,
          "hidden_dim": 1 << 20, "vocab_size": 1 << 22, "max_seq_len": 1 << 22, "max_batch_size": 1 << 16,
          "rope_original_context": 1 << 22}
LARGEST_LLAMA = {"dim": 16384, "n_layers": 126, "n_heads": 128, "n_kv_heads": 64, "multiple_of": 4096,
                 "hidden_dim": 53248, "vocab_size": 128256, "max_seq_len": 131072, "max_batch_size": 32,
                 "rope_original_context": 8192}
MAX_PARAMS = 10 ** 13  # 25x the largest Llama
MAX_ROPE_ENTRIES = 1 << 30  # max_seq_len * head_dim: 8x a 1M context at D = 128 (the KV cache grows with it)


def _count(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def estimate_flops_per_token(args: ModelArgs, seq_len: int) -> float:
    """Training FLOPs per token: 6 * params (forward + backward) plus attention
    (Kaplan et al. 2020, eq. 2.1; PaLM appendix B's 12 * L * C * T term)."""
    n = args.num_params() - args.vocab_size * args.dim  # the embedding lookup is not a matmul
    return 6 * n + 12 * args.n_layers * args.dim * seq_len


def _check_preset_table():
    for name, p in PRESETS.items():
        ModelArgs(**p)  # raises on an impossible preset at import time


_check_preset_table()
