"""Weights: HF and Meta layouts both ways, shard merging by Meta's rules, safe loading of bad input."""

import json
import pytest
import torch
from safetensors.torch import load_file

from annotated_llama import ModelArgs, Tokenizer, Transformer
from annotated_llama import load_model, save_model

from fixtures import DATA, cli

transformers = pytest.importorskip("transformers")


def random_model(args: ModelArgs) -> Transformer:
    model = Transformer(args).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens, cache=False)


def hf_reference(args: ModelArgs):
    config = transformers.LlamaConfig(**args.to_hf_config())
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_transformers_checkpoint_loads_to_the_same_logits(tmp_path, kv_heads):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=kv_heads, vocab_size=101, multiple_of=32)
    ref = hf_reference(args)
    ref.save_pretrained(tmp_path / "hf")
    model, tokenizer = load_model(tmp_path / "hf")
    assert tokenizer is None  # no tokenizer.model in that dir
    tokens = torch.randint(0, 101, (2, 33))
    with torch.no_grad():
        expected = ref(tokens).logits.float()
    err = (logits(model, tokens) - expected).abs().max().item()
    print(f"HF -> ours, n_kv_heads={kv_heads}: max abs logit error {err:.2e}")
    assert err < 1e-4


def test_sharded_transformers_checkpoint(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, multiple_of=32)
    ref = hf_reference(args)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _ = load_model(tmp_path / "hf")
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (logits(model, tokens) - ref(tokens).logits).abs().max() < 1e-4


def test_older_pytorch_model_bin_export(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=101, multiple_of=32)
    ref = hf_reference(args)
    ref.save_pretrained(tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    torch.save(load_file(st), tmp_path / "hf" / "pytorch_model.bin")  # as transformers 4 wrote them
    st.unlink()
    model, _ = load_model(tmp_path / "hf")
    tokens = torch.randint(0, 101, (1, 20))
    with torch.no_grad():
        assert (logits(model, tokens) - ref(tokens).logits).abs().max() < 1e-4


def test_hf_to_ours_to_hf_is_bit_exact(tmp_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=101, multiple_of=32)
    hf_reference(args).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
    model, _ = load_model(tmp_path / "hf")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16  # the stored dtype by default
    save_model(model, None, tmp_path / "ours", format="ours")
    again, _ = load_model(tmp_path / "ours")
    save_model(again, None, tmp_path / "hf2", format="hf")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def split_like_meta(sd, n, vocab_parallel):
    # Written from HF convert_llama_weights_to_hf.py's merge rules, independently of weights/meta.py:
    # column-parallel layers split rows, row-parallel layers split columns, norms are replicated.
    rows = ("wq", "wk", "wv", "w1", "w3", "output")
    shards = [{} for _ in range(n)]
    for name, w in sd.items():
        if "norm" in name:
            parts = [w] * n
        elif name == "tok_embeddings.weight":
            parts = w.chunk(n, 0 if vocab_parallel else 1)
        elif any(f"{r}.weight" in name for r in rows):
            parts = w.chunk(n, 0)
        else:  # wo, w2
            parts = w.chunk(n, 1)
        for i in range(n):
            shards[i][name] = parts[i].clone()
    return shards


def write_meta(path, sd, params, n, vocab_parallel=False, rope_freqs=False):
    path.mkdir(parents=True)
    (path / "params.json").write_text(json.dumps(params))
    for i, shard in enumerate(split_like_meta(sd, n, vocab_parallel)):
        if rope_freqs:
            shard["rope.freqs"] = torch.randn(8)  # LLaMA 1 carries it; must be ignored
        torch.save(shard, path / f"consolidated.{i:02d}.pth")


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("llama3", [False, True])
def test_sharded_meta_checkpoints_load_to_the_unsharded_logits(tmp_path, spm_path, n, llama3):
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=32000, multiple_of=32)
    model = random_model(args)
    sd = model.state_dict()
    params = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": -1, "multiple_of": 32,
              "norm_eps": 1e-5}
    write_meta(tmp_path / "one", sd, params, 1, rope_freqs=True)
    write_meta(tmp_path / "many", sd, params, n, vocab_parallel=llama3, rope_freqs=True)
    (tmp_path / "tokenizer.model").write_bytes(spm_path.read_bytes())  # in the parent dir, as Meta ships it
    one, tok = load_model(tmp_path / "one")
    many, _ = load_model(tmp_path / "many")
    assert tok is not None and one.params.vocab_size == 32000  # -1 resolved from the tokenizer
    tokens = torch.randint(0, 32000, (2, 17))
    expected = logits(model, tokens)
    assert torch.equal(logits(one, tokens), expected)
    assert torch.equal(logits(many, tokens), expected)


def test_meta_to_ours_to_meta_is_bit_exact(tmp_path, spm_path):
    args = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=32000, multiple_of=32)
    sd = random_model(args).to(torch.float16).state_dict()
    params = {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": -1, "multiple_of": 32,
              "norm_eps": 1e-6}
    write_meta(tmp_path / "meta", sd, params, 2)
    (tmp_path / "meta" / "tokenizer.model").write_bytes(spm_path.read_bytes())
    model, tok = load_model(tmp_path / "meta")
    save_model(model, tok, tmp_path / "ours", format="ours")
    model2, tok2 = load_model(tmp_path / "ours")
    save_model(model2, tok2, tmp_path / "meta2", format="meta", shards=2)
    assert json.loads((tmp_path / "meta2" / "params.json").read_text()) == params
    for i in range(2):
        a = torch.load(tmp_path / "meta" / f"consolidated.{i:02d}.pth", weights_only=True)
        b = torch.load(tmp_path / "meta2" / f"consolidated.{i:02d}.pth", weights_only=True)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype == torch.float16 and torch.equal(a[k], b[k]), k


def test_our_hf_export_loads_in_transformers(tmp_path, spm_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # everything must come from the exported dir
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32000, multiple_of=32)
    model, tok = random_model(args), Tokenizer(spm_path)
    save_model(model, tok, tmp_path / "hf", format="hf")
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    tokens = torch.randint(0, 32000, (2, 25))
    with torch.no_grad():
        err = (ref(tokens).logits - logits(model, tokens)).abs().max().item()
    print(f"ours -> HF export: max abs logit error {err:.2e}")
    assert err < 1e-4
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = (DATA_TEXTS + ["  lead", "Hello  spaces", "    def f():\n        return 1", "3333 ünï 🦙"])
    for text in texts:
        assert auto(text)["input_ids"] == tok.encode(text, bos=True, eos=False), repr(text)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, None)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2


DATA_TEXTS = [t for t in (DATA / "llama-spm.inp")
              .read_text().split("\n__ggml_vocab_test__\n") if t]


def test_dtype_is_chosen_at_load(tmp_path):
    model = random_model(ModelArgs.from_name("tiny"))
    save_model(model, None, tmp_path / "ours", format="ours")
    m16, _ = load_model(tmp_path / "ours", dtype="bf16")
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    assert m16.rope_freqs.dtype == torch.float32 and m16.rope_freqs.device.type == "cpu"
    tokens = torch.randint(0, 512, (1, 9))
    assert (logits(m16, tokens) - logits(model, tokens)).abs().max() < 0.1


# ---- bad input: one line naming the file, non-zero exit, nothing overwritten ---------------------

@pytest.fixture
def good_ours(tmp_path):
    save_model(random_model(ModelArgs.from_name("tiny")), None, tmp_path / "good", format="ours")
    return tmp_path / "good"


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def convert_onto_existing(src, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir(exist_ok=True)
    (dst / "keep.txt").write_text("user data")
    result = cli("convert", src, dst, "--to", "hf", "--force", check=False)
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    assert (dst / "keep.txt").read_text() == "user data"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporaries left behind
    return result


def test_truncated_safetensors(tmp_path, good_ours):
    f = good_ours / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(convert_onto_existing(good_ours, tmp_path), f)


def test_pickled_function_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:  # unpickling this calls os.system
        def __reduce__(self):
            return (__import__("os").system, (f"touch {marker}",))

    src = tmp_path / "meta"
    src.mkdir()
    (src / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 512,
                                                 "multiple_of": 32}))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Evil()}, src / "consolidated.00.pth")
    result = convert_onto_existing(src, tmp_path)
    assert_one_line_error(result, src / "consolidated.00.pth")
    assert not marker.exists()


def test_params_json_contradicting_the_tensors(tmp_path, good_ours):
    params = json.loads((good_ours / "params.json").read_text())
    (good_ours / "params.json").write_text(json.dumps({**params, "dim": 128}))
    result = convert_onto_existing(good_ours, tmp_path)
    assert_one_line_error(result, good_ours / "model.safetensors", good_ours / "params.json")


def test_directory_without_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(convert_onto_existing(empty, tmp_path), empty)
    (empty / "params.json").write_text("{}")
    assert_one_line_error(convert_onto_existing(empty, tmp_path), empty, "no weights")


def test_existing_destination_needs_force(tmp_path, good_ours):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "config.json").write_text("mine")
    assert_one_line_error(cli("convert", good_ours, dst, "--to", "hf", check=False), dst, "--force")
    assert (dst / "config.json").read_text() == "mine"
    result = cli("convert", good_ours, dst, "--to", "hf", "--force", "--quiet", check=False)
    assert result.returncode == 0, result.stderr
    assert load_model(dst)[0].params.dim == 64


@pytest.mark.slow
def test_llama3_hf_export_tokenizes_like_tiktoken(tmp_path, llama3_tokenizer):
    # transformers cannot read Meta's tiktoken file; our tokenizer.json (byte-level BPE with
    # merges ranked like tiktoken's and Llama 3's split regex) must give the same ids.
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=llama3_tokenizer.n_words, multiple_of=32)
    save_model(Transformer(args), llama3_tokenizer, tmp_path / "hf", format="hf", dtype="bf16")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = (DATA / "llama3-bpe.inp").read_text()
    for text in [t for t in texts.split("\n__ggml_vocab_test__\n") if t] + ["  x = 12345;\n\tnew line"]:
        assert auto(text)["input_ids"] == llama3_tokenizer.encode(text, bos=True, eos=False), repr(text)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sorted(llama3_tokenizer.stop_ids)


def test_lora_adapter_is_applied_at_load(tmp_path):
    from annotated_llama.transforms.lora import apply_lora, lora_modules, save_adapter

    base = random_model(ModelArgs.from_name("tiny-gqa"))
    save_model(base, None, tmp_path / "base", format="ours")
    tuned = apply_lora(random_model(ModelArgs.from_name("tiny-gqa")), targets="wq,wv", r=4)
    tuned.load_state_dict(base.state_dict(), strict=False)  # same base weights
    with torch.no_grad():
        for m in lora_modules(tuned).values():
            m.lora_B.normal_()  # B starts at zero: make the adapter do something
    save_adapter(tuned, tmp_path / "adapter")
    loaded, _ = load_model(tmp_path / "base", lora=tmp_path / "adapter")
    tokens = torch.randint(0, 512, (1, 12))
    expected = logits(tuned.eval(), tokens)
    assert (logits(loaded, tokens) - expected).abs().max() < 1e-5
    assert (logits(base, tokens) - expected).abs().max() > 1e-3
