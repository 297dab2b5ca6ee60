"""LoRA: a no-op at init, only adapters train, merge == unmerged, adapter files round-trip, bad adapters."""

import json

import pytest
import torch

from annotated_llama.transforms.lora import (LoRALinear, apply_lora, is_lora_parameter, load_adapter, lora_modules,
                                  merge_and_unload, merge_lora, parse_targets, save_adapter, unmerge_lora)

from fixtures import tiny_model

def tiny(name="tiny", **kw):
    return tiny_model(0, name, **kw)


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


TOKENS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))


def test_parse_targets():
    assert parse_targets("wq,wv") == ["wq", "wv"]
    assert parse_targets("v_proj,q_proj") == ["wq", "wv"]
    assert parse_targets("all") == ["wq", "wk", "wv", "wo", "w1", "w3", "w2"]
    with pytest.raises(ValueError, match="unknown LoRA target 'wz'"):
        parse_targets("wq,wz")


def test_init_is_identity_and_only_adapters_are_trainable():
    model = tiny()
    base = model(TOKENS, cache=False)
    apply_lora(model, "all", r=4, alpha=8)
    assert len(lora_modules(model)) == 2 * 7
    # B = 0 at init (Hu et al. 4.1): exactly the base model's logits
    assert torch.equal(model(TOKENS, cache=False), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_parameter(n) for n in trainable)
    # the base state-dict names (Meta's) are untouched
    assert "layers.0.attention.wq.weight" in model.state_dict()


def test_training_changes_only_adapter_tensors():
    model = tiny()
    apply_lora(model, "wq,wv", r=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        logits = model(TOKENS[:, :-1], cache=False)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), TOKENS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(is_lora_parameter(k) for k in changed)
    assert any(k.endswith("lora_B") for k in changed)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_merge_equals_unmerged_and_unmerge_restores(preset):
    model = tiny(preset)
    w0 = model.layers[0].attention.wq.weight.detach().clone()
    apply_lora(model, "all", r=4, alpha=16)
    randomize_adapters(model)
    unmerged = model(TOKENS, cache=False)
    merge_lora(model)
    assert torch.allclose(model(TOKENS, cache=False), unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    assert torch.allclose(model.layers[0].attention.wq.weight, w0, atol=1e-6)
    merge_and_unload(model)
    assert not lora_modules(model)
    assert set(model.state_dict()) == set(tiny(preset).state_dict())
    assert torch.allclose(model(TOKENS, cache=False), unmerged, atol=1e-5, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = tiny("tiny-gqa")
    apply_lora(model, "wq,wk,wv,w2", r=4, alpha=8)
    randomize_adapters(model)
    expected = model(TOKENS, cache=False)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == ["down_proj", "k_proj", "q_proj", "v_proj"]
    fresh = load_adapter(tiny("tiny-gqa"), tmp_path)
    assert torch.allclose(fresh(TOKENS, cache=False), expected, atol=1e-6, rtol=0)


def _write_adapter(tmp_path, model, **config_changes):
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))


def test_adapter_with_wrong_rank_is_rejected(tmp_path):
    model = apply_lora(tiny(), "wq,wv", r=4, alpha=8)
    _write_adapter(tmp_path, model, r=8)
    target = tiny()
    with pytest.raises(ValueError, match=r"has rank 4 but the config says r=8"):
        load_adapter(target, tmp_path)
    assert not lora_modules(target)  # nothing half-applied


def test_adapter_with_unlisted_or_unknown_targets_is_rejected(tmp_path):
    model = apply_lora(tiny(), "wq,wv", r=4, alpha=8)
    _write_adapter(tmp_path, model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"weights hold v_proj but target_modules is \['q_proj'\]"):
        load_adapter(tiny(), tmp_path)


def test_adapter_for_another_shape_is_rejected(tmp_path):
    save_adapter(apply_lora(tiny(), "wq", r=4, alpha=8), tmp_path)
    with pytest.raises(ValueError, match=r"q_proj in layer 0 is 64x64 but the model's wq is 128x128"):
        load_adapter(tiny(dim=128), tmp_path)
    with pytest.raises(ValueError, match=r"adapter targets layer 1 but the model has 1 layers"):
        load_adapter(tiny(n_layers=1), tmp_path)


def test_missing_adapter_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter dir"):
        load_adapter(tiny(), tmp_path)


def test_lora_linear_math():
    lin = torch.nn.Linear(6, 5, bias=False)
    m = LoRALinear(lin, r=2, alpha=6)
    with torch.no_grad():
        m.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ lin.weight.T + 3.0 * (x @ m.lora_A.T @ m.lora_B.T)  # scaling alpha / r = 3
    assert torch.allclose(m(x), expected, atol=1e-6)


def test_adapters_follow_the_models_mode(tmp_path):
    # load_model returns an eval() model: adapters added to it must not apply dropout
    model = apply_lora(tiny().eval(), "wq,wv", r=4, alpha=8, dropout=0.5)
    randomize_adapters(model)
    assert not any(m.training for m in lora_modules(model).values())
    assert torch.equal(model(TOKENS, cache=False), model(TOKENS, cache=False))
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny().eval(), tmp_path)
    assert not any(m.training for m in lora_modules(loaded).values())
    assert torch.allclose(loaded(TOKENS, cache=False), model(TOKENS, cache=False), atol=1e-6)
