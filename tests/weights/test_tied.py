"""Tied embeddings (Llama 3.2 1B/3B): one V x C matrix for the input embedding and the output head,
in every non-GGUF layout both ways, after a meta-device load, and under LoRA.

References: transformers' LlamaForCausalLM with tie_word_embeddings (its save_pretrained writes no
lm_head.weight), and PEFT's LoRA on lm_head."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from annotated_llama import ModelArgs, Transformer
from annotated_llama.transforms.lora import apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter
from annotated_llama.weights import load_model, save_model
from annotated_llama.weights.hf import meta_to_hf_state_dict

ARGS = ModelArgs.from_name("tiny-llama3", tie_word_embeddings=True)  # GQA, llama3 rope scaling
TOKENS = torch.randint(0, ARGS.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens, cache=False).float()


def tied_model(seed=0):
    torch.manual_seed(seed)
    model = Transformer(ARGS).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    assert model.output.weight is model.tok_embeddings.weight
    return model


def hf_tied(seed=0):
    torch.manual_seed(seed)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARGS.to_hf_config())).eval()
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    return ref


def assert_tied(model):
    assert model.params.tie_word_embeddings
    assert model.output.weight is model.tok_embeddings.weight  # one Parameter, re-tied after assign=True
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))


def test_hub_layout_without_lm_head_loads_tied(tmp_path):
    ref = hf_tied()
    ref.save_pretrained(tmp_path / "hf")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" not in stored  # transformers writes the shared matrix once
    model, _ = load_model(tmp_path / "hf")
    assert_tied(model)
    with torch.no_grad():
        err = (logits(model) - ref(TOKENS).logits).abs().max().item()
    print(f"tied HF checkpoint: max abs logit error {err:.1e}")
    assert err < 1e-4
    # loaded in another dtype, still one matrix
    assert_tied(load_model(tmp_path / "hf", dtype="bf16")[0])


def test_hf_file_with_a_copy_of_lm_head(tmp_path):
    ref = hf_tied()
    ref.save_pretrained(tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    sd = load_file(f)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # as some older exports stored it
    save_file(sd, f, metadata={"format": "pt"})
    model, _ = load_model(tmp_path / "hf")
    assert_tied(model)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1  # contradicts tie_word_embeddings: refused, named
    save_file(sd, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.safetensors: the output matrix differs from the embedding"):
        load_model(tmp_path / "hf")


@pytest.mark.parametrize("fmt", ["ours", "hf", "meta"])
def test_every_layout_round_trips_a_tied_model(tmp_path, fmt):
    model = tied_model()
    save_model(model, None, tmp_path / fmt, format=fmt)
    if fmt == "ours":
        assert json.loads((tmp_path / fmt / "params.json").read_text())["tie_word_embeddings"] is True
        assert "output.weight" not in load_file(tmp_path / fmt / "model.safetensors")  # stored once
    elif fmt == "hf":
        assert json.loads((tmp_path / fmt / "config.json").read_text())["tie_word_embeddings"] is True
        assert "lm_head.weight" not in load_file(tmp_path / fmt / "model.safetensors")
        ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / fmt).eval()
        assert ref.lm_head.weight is ref.model.embed_tokens.weight
        with torch.no_grad():
            assert (ref(TOKENS).logits - logits(model)).abs().max() < 1e-4
    else:  # Meta's layout: params.json has no such flag; output.weight is a copy, as Meta ships it
        assert "tie_word_embeddings" not in json.loads((tmp_path / fmt / "params.json").read_text())
        sd = torch.load(tmp_path / fmt / "consolidated.00.pth", weights_only=True)
        assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
        assert sd["output.weight"].data_ptr() != sd["tok_embeddings.weight"].data_ptr()
    loaded, _ = load_model(tmp_path / fmt)
    assert_tied(loaded)
    assert torch.equal(logits(loaded), logits(model))


def test_untied_meta_checkpoint_stays_untied(tmp_path):
    args = ModelArgs.from_name("tiny-llama3")
    torch.manual_seed(0)
    save_model(Transformer(args), None, tmp_path / "meta", format="meta")
    loaded, _ = load_model(tmp_path / "meta")
    assert not loaded.params.tie_word_embeddings and loaded.output.weight is not loaded.tok_embeddings.weight


def cli(*argv):
    from annotated_llama.__main__ import main
    assert main([str(a) for a in argv]) == 0


def test_convert_round_trips_are_bit_exact(tmp_path):
    # the Hub's layout -> ours -> hf, and Meta's layout (two copies) -> ours -> meta, file for file
    hf_tied().to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    cli("convert", tmp_path / "hf", tmp_path / "ours", "--to", "ours", "--quiet")
    cli("convert", tmp_path / "ours", tmp_path / "hf2", "--to", "hf", "--quiet")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    cli("convert", tmp_path / "hf", tmp_path / "meta", "--to", "meta", "--quiet")
    cli("convert", tmp_path / "meta", tmp_path / "ours2", "--to", "ours", "--quiet")
    cli("convert", tmp_path / "ours2", tmp_path / "meta2", "--to", "meta", "--quiet")
    a = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    b = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    assert a.keys() == b.keys() and "output.weight" in a
    assert all(a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "meta" / "params.json").read_text() == (tmp_path / "meta2" / "params.json").read_text()


def test_saving_refuses_args_that_tie_separate_matrices(tmp_path):
    model = tied_model()
    model.output.weight = torch.nn.Parameter(model.output.weight.detach().clone())  # untied by hand
    with pytest.raises(ValueError, match="tie the embeddings but its output.weight is a separate tensor"):
        save_model(model, None, tmp_path / "x", format="ours")


# ---- LoRA on the output head of a tied model -------------------------------------------------------

def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def test_lora_on_a_tied_output_never_changes_the_embedding():
    model = tied_model()
    embedding = model.tok_embeddings.weight.detach().clone()
    apply_lora(model, "wq,output", r=4, alpha=8).train()
    randomize(model)
    assert "output" in lora_modules(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few training steps: only the adapters move
        loss = torch.nn.functional.cross_entropy(model(TOKENS[:, :-1], cache=False).flatten(0, 1),
                                                 TOKENS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(model.tok_embeddings.weight, embedding)
    assert model.output.weight is model.tok_embeddings.weight  # the head reads the same matrix


def test_merging_a_tied_output_adapter_unties(tmp_path):
    model = tied_model()
    embedding = model.tok_embeddings.weight.detach().clone()
    apply_lora(model, "wv,output", r=4, alpha=8)
    randomize(model)
    with_adapter = logits(model.eval())
    assert (with_adapter - logits(tied_model())).abs().max() > 1e-2  # the adapter does something
    delta = model.output.delta_weight().detach()
    merged = merge_and_unload(model)
    assert not lora_modules(merged) and not merged.params.tie_word_embeddings
    assert torch.equal(merged.tok_embeddings.weight, embedding)  # the input side is untouched
    assert torch.allclose(merged.output.weight, embedding + delta, atol=1e-6)
    assert (logits(merged) - with_adapter).abs().max() < 1e-4
    save_model(merged, None, tmp_path / "hf", format="hf")  # saved untied: an lm_head of its own
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "hf" / "model.safetensors")
    assert (logits(load_model(tmp_path / "hf")[0]) - with_adapter).abs().max() < 1e-4


def test_output_adapter_interoperates_with_peft(tmp_path):
    # ours -> PEFT on the HF export of the tied base, and PEFT's lm_head adapter -> ours
    ours = tied_model()
    hf = hf_tied()
    hf.load_state_dict(meta_to_hf_state_dict({k: v for k, v in ours.state_dict().items() if k != "output.weight"},
                                             ARGS), strict=False)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    apply_lora(ours, "wq,output", r=4, alpha=8)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["lm_head", "q_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert (peft_model(TOKENS).logits - logits(ours)).abs().max() < 1e-4
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = tied_model()
    load_adapter(fresh, tmp_path / "peft")
    assert sorted(lora_modules(fresh)) == ["layers.0.attention.wq", "layers.1.attention.wq", "output"]
    assert (logits(fresh) - logits(ours)).abs().max() < 1e-5
    assert fresh.output.weight is fresh.tok_embeddings.weight
