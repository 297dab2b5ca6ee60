import json

import pytest

from annotated_llama import ModelArgs
from annotated_llama.core.config import PRESETS

# FFN widths of Meta's released checkpoints (HF convert_llama_weights_to_hf.py's size table) and the
# LLaMA paper's parameter counts (Touvron et al. 2023, Table 2).
@pytest.mark.parametrize("name,hidden,billions", [
    ("llama-7b", 11008, 6.7), ("llama-13b", 13824, 13.0), ("llama-33b", 17920, 32.5),
    ("llama-65b", 22016, 65.2), ("llama-2-70b", 28672, 68.9), ("llama-3-8b", 14336, 8.0),
])
def test_presets_derive_metas_sizes(name, hidden, billions):
    args = ModelArgs.from_name(name)
    assert args.ffn_hidden_dim == hidden
    # the paper truncates to one decimal (65,285,660,672 parameters is "65.2B")
    assert int(args.num_params() / 1e8) / 10 == billions


def test_norm_eps_per_size():
    assert ModelArgs.from_name("llama-7b").norm_eps == 1e-6
    assert ModelArgs.from_name("llama-65b").norm_eps == 1e-5
    assert ModelArgs.from_name("llama-2-7b").norm_eps == 1e-5


def test_stories15m_hidden_dim():
    assert ModelArgs.from_name("stories15M").ffn_hidden_dim == 768


def test_params_json_round_trip(tmp_path):
    meta_7b = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    p = tmp_path / "params.json"
    p.write_text(json.dumps(meta_7b))
    args = ModelArgs.from_params_json(p)
    assert args.vocab_size == -1 and args.n_kv_heads == 32 and args.ffn_hidden_dim == 11008
    p.write_text(json.dumps(args.to_params_json()))
    assert ModelArgs.from_params_json(p) == args


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip(name):
    args = ModelArgs.from_name(name)
    back = ModelArgs.from_hf_config(args.to_hf_config())
    assert back.ffn_hidden_dim == args.ffn_hidden_dim
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta",
                  "use_scaled_rope", "max_seq_len"):
        assert getattr(back, field) == getattr(args, field), field


def test_bad_configurations_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown model preset 'llama-8b'"):
        ModelArgs.from_name("llama-8b")
    with pytest.raises(ValueError, match="dim=100 is not divisible by n_heads=3"):
        ModelArgs(dim=100, n_layers=1, n_heads=3)
    with pytest.raises(ValueError, match="n_heads=8 is not divisible by n_kv_heads=3"):
        ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=3)
    p = tmp_path / "params.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="params.json: not valid JSON"):
        ModelArgs.from_params_json(p)
    p.write_text('{"dim": 64, "n_layers": 1, "n_heads": 5}')
    with pytest.raises(ValueError, match=r"params.json: .*not divisible"):
        ModelArgs.from_params_json(p)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ModelArgs.from_params_json(tmp_path / "missing.json")


# ---- released presets against what was published ---------------------------------------------------
# Parameter counts as the Hub reports them: model.safetensors.index.json's metadata.total_size (bytes)
# halved for these bf16 checkpoints, or the safetensors header's count for single-file models (the
# "Model size" of the model page; llama.cpp's n_params for the GGUF conversions agrees).
PUBLISHED_COUNTS = {
    "llama-3.2-1b": 1_235_814_400,   # meta-llama/Llama-3.2-1B (model card: "1B (1.23B)")
    "llama-3.2-3b": 3_212_749_824,   # meta-llama/Llama-3.2-3B, total_size 6,425,499,648 (card: "3B (3.21B)")
    "llama-3.3-70b": 70_553_706_496,  # meta-llama/Llama-3.3-70B-Instruct, total_size 141,107,412,992
    "code-llama-7b": 6_738_546_688,  # codellama/CodeLlama-7b-hf
    "code-llama-13b": 13_016_028_160,  # codellama/CodeLlama-13b-hf
    "code-llama-34b": 33_743_970_304,  # codellama/CodeLlama-34b-hf
    "tinyllama-1.1b": 1_100_048_384,  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_released_presets_have_the_published_parameter_counts(name):
    args = ModelArgs.from_name(name)
    assert args.num_params() == PUBLISHED_COUNTS[name]
    # and counted from the module itself (shapes only), a tied head once
    import torch
    from annotated_llama import Transformer
    with torch.device("meta"):
        model = Transformer(args)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_COUNTS[name]


# config.json of each release on the Hugging Face Hub (huggingface.co/<repo>/blob/main/config.json), as
# published; only transformers_version and _name_or_path are left out. bos/eos ids are the tokenizer's.
LLAMA_32_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}
CODE_LLAMA = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "initializer_range": 0.02, "max_position_embeddings": 16384, "model_type": "llama",
              "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True}
LLAMA_3 = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
           "bos_token_id": 128000, "hidden_act": "silu", "initializer_range": 0.02, "mlp_bias": False,
           "model_type": "llama", "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
           "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 128256, "max_position_embeddings": 131072}
PUBLISHED_CONFIGS = {
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {**LLAMA_3, "eos_token_id": 128001, "head_dim": 64, "hidden_size": 2048,
                     "intermediate_size": 8192, "num_attention_heads": 32, "num_hidden_layers": 16,
                     "num_key_value_heads": 8, "rope_scaling": LLAMA_32_ROPE, "tie_word_embeddings": True},
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": {**LLAMA_3, "eos_token_id": 128001, "head_dim": 128, "hidden_size": 3072,
                     "intermediate_size": 8192, "num_attention_heads": 24, "num_hidden_layers": 28,
                     "num_key_value_heads": 8, "rope_scaling": LLAMA_32_ROPE, "tie_word_embeddings": True},
    # meta-llama/Llama-3.3-70B-Instruct
    "llama-3.3-70b": {**LLAMA_3, "eos_token_id": [128001, 128008, 128009], "head_dim": 128, "hidden_size": 8192,
                      "intermediate_size": 28672, "num_attention_heads": 64, "num_hidden_layers": 80,
                      "num_key_value_heads": 8, "tie_word_embeddings": False,
                      "rope_scaling": {**LLAMA_32_ROPE, "factor": 8.0}},
    # codellama/CodeLlama-7b-hf, -13b-hf, -34b-hf
    "code-llama-7b": {**CODE_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                      "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32016},
    "code-llama-13b": {**CODE_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
                       "num_hidden_layers": 40, "num_key_value_heads": 40, "vocab_size": 32016},
    "code-llama-34b": {**CODE_LLAMA, "hidden_size": 8192, "intermediate_size": 22016, "num_attention_heads": 64,
                       "num_hidden_layers": 48, "num_key_value_heads": 8, "vocab_size": 32000},
    # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "tinyllama-1.1b": {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1,
                       "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
                       "intermediate_size": 5632, "max_position_embeddings": 2048, "model_type": "llama",
                       "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
                       "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
                       "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
                       "vocab_size": 32000},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_released_presets_write_the_published_config_json(name):
    published = PUBLISHED_CONFIGS[name]
    ours = ModelArgs.from_name(name).to_hf_config(bos_token_id=published["bos_token_id"],
                                                 eos_token_id=published["eos_token_id"], torch_dtype="bfloat16")
    differ = {k: (v, ours.get(k, "<absent>")) for k, v in published.items() if ours.get(k, "<absent>") != v}
    assert not differ, differ
    # and reading the published file gives the preset's architecture back (the FFN width as a number:
    # config.json has no multiple_of / ffn_dim_multiplier)
    back, preset = ModelArgs.from_hf_config(published), ModelArgs.from_name(name)
    assert back.ffn_hidden_dim == preset.ffn_hidden_dim and back.num_params() == preset.num_params()
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "use_scaled_rope",
                  "rope_scale_factor", "rope_original_context", "max_seq_len", "tie_word_embeddings"):
        assert getattr(back, field) == getattr(preset, field), field


def test_tied_embeddings_round_trip_through_both_configs(tmp_path):
    args = ModelArgs.from_name("tiny-llama3", tie_word_embeddings=True)
    assert ModelArgs.from_hf_config(args.to_hf_config()).tie_word_embeddings
    p = tmp_path / "params.json"
    p.write_text(json.dumps(args.to_params_json()))
    assert ModelArgs.from_params_json(p) == args
    assert "tie_word_embeddings" not in ModelArgs.from_name("tiny").to_params_json()  # Meta's fields only
