import json

import pytest

from annotated_llama import ModelArgs
from annotated_llama.config import PRESETS

# FFN widths from Meta's released checkpoints (REFERENCE b3) and the paper's parameter counts.
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
