"""A Llama 3.2-style Hub snapshot as downloaded: config.json as the Hub writes it, sharded safetensors
with an index, only tokenizer.json (+ tokenizer_config.json, generation_config.json), and Meta's files
under original/. References: transformers' LlamaForCausalLM and AutoTokenizer on the same files."""

import json
import random
import shutil

import pytest
import torch
import transformers

from annotated_llama import Llama, Tokenizer
from annotated_llama.weights import detect_format, load_model, save_model
from fixtures import DATA

from fixtures import golden_cases, random_strings

LLAMA_3_2_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}
# meta-llama/Llama-3.2-1B-Instruct's config.json fields, at a tiny size (GQA 4:2, 512 positions)
HUB_CONFIG = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
              "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "head_dim": 16, "hidden_act": "silu",
              "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 192, "max_position_embeddings": 512,
              "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2,
              "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": LLAMA_3_2_ROPE,
              "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True,
              "vocab_size": 128256}
GENERATION = {"bos_token_id": 128000, "do_sample": True, "eos_token_id": [128001, 128008, 128009],
              "temperature": 0.6, "top_p": 0.9}
# Meta's params.json of Llama 3.2 (no rope factor, no tie flag: its files hold output.weight as a copy)
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
               "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True}


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, llama3_tokenizer_json, llama3_tokenizer):
    root = tmp_path_factory.mktemp("hub") / "snapshots" / "0123abc"
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HUB_CONFIG)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so greedy choices are clear-cut
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    ref.save_pretrained(root, max_shard_size="8MB")
    (root / "config.json").write_text(json.dumps(HUB_CONFIG, indent=2))  # the Hub's (transformers 4.x) spelling
    shutil.copy(llama3_tokenizer_json, root / "tokenizer.json")
    (root / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True,
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": (DATA / "chat_templates" / "llama-3.1-instruct.jinja").read_text()}))
    (root / "generation_config.json").write_text(json.dumps(GENERATION))
    # original/: Meta's layout of the same weights
    ours, _ = load_model(root)
    save_model(ours, llama3_tokenizer, root / "original", format="meta")
    (root / "original" / "params.json").write_text(json.dumps(META_PARAMS))
    assert sorted(p.name for p in (root / "original").iterdir()) == ["consolidated.00.pth", "params.json",
                                                                     "tokenizer.model"]
    return root, transformers.LlamaForCausalLM.from_pretrained(root).eval()


def test_snapshot_is_read_from_its_hf_side(snapshot):
    root, _ = snapshot
    assert (root / "model.safetensors.index.json").is_file() and not (root / "tokenizer.model").exists()
    assert detect_format(root) == "hf"
    model, tok = load_model(root)
    assert model.params.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight
    assert model.params.rope_scale_factor == 32.0 and model.params.max_seq_len == 512
    assert tok.kind == "tokenizers" and tok.path == root / "tokenizer.json"
    assert (tok.bos_id, tok.eos_id, tok.n_words) == (128000, 128009, 128256)
    assert tok.stop_ids == {128001, 128008, 128009}  # generation_config.json's list
    assert tok.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert tok.chat_template.startswith("{{- bos_token }}")


def test_logits_match_transformers_past_position_256(snapshot):
    root, ref = snapshot
    model, _ = load_model(root)
    tokens = torch.randint(0, 128256, (1, 400), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens, cache=False), ref(tokens).logits
    err = (ours - theirs).abs().max().item()
    late = (ours[:, 256:] - theirs[:, 256:]).abs().max().item()
    print(f"Hub snapshot: max abs logit error {err:.2e} overall, {late:.2e} at positions 256-399 "
          f"(logits up to {theirs.abs().max():.0f})")
    assert late < 1e-4 and err < 1e-4


def test_greedy_generation_matches_transformers(snapshot):
    root, ref = snapshot
    model, tok = load_model(root)
    prompt = tok.encode("The llama (Lama glama) is a domesticated South American camelid. " * 20, bos=True, eos=False)
    assert len(prompt) > 256
    llama = Llama(model, tok)
    (ours,), _ = llama.generate([prompt], max_gen_len=24, temperature=0)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24,
                           eos_token_id=sorted(tok.stop_ids), pad_token_id=128001)
    theirs = out[0, len(prompt):].tolist()
    theirs = theirs[:next((i for i, t in enumerate(theirs) if t in tok.stop_ids), len(theirs))]  # Meta: cut at stop
    print(f"greedy after a {len(prompt)}-token prompt: {len(ours)} tokens, equal to transformers': {ours == theirs}")
    assert ours == theirs and len(ours) > 0


def test_original_alone_loads_metas_side(snapshot, tmp_path):
    root, ref = snapshot
    only = tmp_path / "snapshot"
    shutil.copytree(root / "original", only / "original")
    assert detect_format(only) == "meta"
    model, tok = load_model(only)
    assert tok.kind == "tiktoken" and tok.path == only / "original" / "tokenizer.model"
    # Meta's files: the copy of the embedding is recognised, and a tied Llama 3.2 gets its factor 32
    assert model.params.tie_word_embeddings and model.params.rope_scale_factor == 32.0
    tokens = torch.randint(0, 128256, (1, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(tokens, cache=False) - ref(tokens).logits).abs().max() < 1e-4


def test_convert_snapshot_keeps_its_tokenizer_files(snapshot, tmp_path):
    root, _ = snapshot
    model, tok = load_model(root)
    for fmt in ("ours", "hf"):
        save_model(model, tok, tmp_path / fmt, format=fmt)
        again, tok2 = load_model(tmp_path / fmt)
        assert tok2.kind == "tokenizers" and tok2.stop_ids == tok.stop_ids and tok2.chat_template == tok.chat_template
        assert again.output.weight is again.tok_embeddings.weight
        assert tok2.encode("Hello <|eot_id|> world", True, False) == tok.encode("Hello <|eot_id|> world", True, False)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto("Hello world")["input_ids"] == tok.encode("Hello world", bos=True, eos=False)


# ---- token ids against transformers' AutoTokenizer ----------------------------------------------------

def agreement(ours: Tokenizer, auto, texts) -> int:
    """How many texts get the same ids; special-token text in the input is text for both
    (ours always; transformers with split_special_tokens=True)."""
    same = 0
    for text in texts:
        expected = auto(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert ours.encode(text, bos=False, eos=False) == expected, repr(text)
        assert ours.decode(expected) == auto.decode(expected, clean_up_tokenization_spaces=False), repr(text)
        same += 1
    return same


def texts_for(stem, specials):
    rng = random.Random(7)
    texts = [t for t, _ in golden_cases(stem)] + random_strings(rng, 300)
    return texts + [f"a {s} b{s}" for s in specials] + ["  lead", "Hello  spaces", "    def f():\n        return 1"]


def test_llama3_style_tokenizer_json_matches_autotokenizer(llama3_tokenizer_json, llama3_tokenizer, tmp_path):
    shutil.copy(llama3_tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                                "eos_token": "<|end_of_text|>"}))
    ours, auto = Tokenizer(tmp_path / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts = texts_for("llama3-bpe", ["<|eot_id|>", "<|begin_of_text|>", "<|reserved_special_token_5|>"])
    n = agreement(ours, auto, texts)
    assert all(ours.encode(t, bos=True, eos=False) == llama3_tokenizer.encode(t, bos=True, eos=False) for t in texts)
    assert auto("Hello")["input_ids"] == ours.encode("Hello", bos=True, eos=False)  # BOS from the post-processor
    print(f"Llama 3 tokenizer.json: {n}/{len(texts)} texts tokenized as AutoTokenizer does (and as tiktoken does)")


@pytest.mark.parametrize("style", ["transformers", "legacy"])
def test_llama2_style_tokenizer_json_matches_autotokenizer(style, llama2_tokenizer_json, spm_path, tmp_path):
    if style == "legacy":  # the original Llama-2-7b-hf layout: a "▁" prepended by the normalizer
        from annotated_llama.weights.hf import tokenizer_json
        (tmp_path / "tokenizer.json").write_text(tokenizer_json(Tokenizer(spm_path)))
    else:  # transformers 5's conversion of tokenizer.model: Metaspace pre-tokenizer
        shutil.copy(llama2_tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>"}))
    ours, auto = Tokenizer(tmp_path / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.n_words, ours.stop_ids) == (1, 2, -1, 32000, {2})
    texts = texts_for("llama-spm", ["<s>", "</s>", "<unk>"])
    n = agreement(ours, auto, texts)
    sp = Tokenizer(spm_path)
    same_as_sp = sum(ours.encode(t, True, False) == sp.encode(t, True, False) for t in texts)
    print(f"Llama 2 tokenizer.json ({style}): {n}/{len(texts)} texts as AutoTokenizer; "
          f"{same_as_sp}/{len(texts)} as SentencePiece's tokenizer.model")
