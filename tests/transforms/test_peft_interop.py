"""PEFT interop: our adapters load in peft.PeftModel onto the HF export of the base, and PEFT's load in ours.

wq/wk are the interesting targets: HF keeps their rows in rotate-half order, so lora_B's rows must be
permuted like the base weight's rows (a wrong permutation fails these comparisons by ~1e-1)."""

import pytest
import torch

import peft  # the dev extra: a missing reference fails the test, it is never skipped
import transformers

from annotated_llama import ModelArgs, Transformer
from annotated_llama.transforms.lora import apply_lora, load_adapter, lora_modules, save_adapter
from annotated_llama.weights.hf import meta_to_hf_state_dict

TOKENS = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(5))


def base_pair(preset):
    torch.manual_seed(0)
    args = ModelArgs.from_name(preset)
    ours = Transformer(args).eval()
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config())).eval()
    hf.load_state_dict(meta_to_hf_state_dict(ours.state_dict(), args))
    return ours, hf


@pytest.mark.parametrize("preset,targets", [("tiny", "wq,wk"), ("tiny-gqa", "all")])
def test_our_adapter_loads_in_peft(tmp_path, preset, targets):
    ours, hf = base_pair(preset)
    apply_lora(ours, targets, r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
    expected = ours(TOKENS, cache=False)
    base_logits = hf(TOKENS).logits
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    with torch.no_grad():
        got = peft_model(TOKENS).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gqa"])
def test_peft_adapter_loads_in_ours(tmp_path, preset):
    ours, hf = base_pair(preset)
    config = peft.LoraConfig(r=4, lora_alpha=12, task_type="CAUSAL_LM", init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    torch.manual_seed(2)
    peft_model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        expected = peft_model(TOKENS).logits
    peft_model.save_pretrained(str(tmp_path))
    load_adapter(ours, tmp_path)
    assert len(lora_modules(ours)) == 7 * ours.params.n_layers
    got = ours(TOKENS, cache=False)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)


def test_peft_loads_our_adapter_onto_our_hf_export(tmp_path):
    # the user's path: `save_model(format="hf")`, then transformers + PEFT from the files
    from annotated_llama.weights import save_model

    ours, _ = base_pair("tiny-gqa")
    save_model(ours, None, tmp_path / "hf", format="hf")
    apply_lora(ours, "wq,wk,w1", r=2, alpha=4)
    with torch.no_grad():
        for i, m in enumerate(lora_modules(ours).values()):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=torch.Generator().manual_seed(i)) * 0.2)
    save_adapter(ours, tmp_path / "adapter")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = peft_model(TOKENS).logits
    assert torch.allclose(got, ours(TOKENS, cache=False), atol=1e-4, rtol=0)
