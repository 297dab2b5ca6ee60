"""The model, generation, the engine's backends, quantization, LoRA and training on the device named by
ANNOTATED_LLAMA_TEST_DEVICE (default cpu, so CI runs every test; `cuda` on a GPU machine, as
bench/gpu_check.sh does), each checked against a CPU float32 reference computed in the test.

Stated bounds (max |error| relative to the range of the reference logits unless said otherwise):
float32 on the device 1e-4 absolute (as tests/core/test_model.py against HF); a bfloat16 model 0.02;
int8 0.02 and int4 0.15 from float32 (a CPU measures 0.005 and 0.06 on the default model), and
0.02 between the same quantized weights on the device and on the CPU. Greedy tokens: at every
step, the token a path chose is within `tol` of the CPU float32 model's best logit (given the
path's own prefix), as a fraction of the logit range: 1e-4 for float32 on another device, 0.02 for
bfloat16 and int8, 0.08 for int4 (see _worst_deficit and TIE). Only this module's imports (torch,
transformers, safetensors, sentencepiece, tiktoken, tqdm, numpy) are needed on a GPU machine.
"""

import copy
import os
from pathlib import Path

import pytest
import torch

from annotated_llama import ModelArgs, Transformer
from annotated_llama.transforms.quantize import Int4Linear, Int8Linear, quantize_model

from fixtures import NumberVocab, REPO

ROOT = REPO
# Read at collection time too: compiled-step tests exist only where they exercise CUDA graphs
# (on a CPU, inductor's C++ build takes tens of seconds per model).
ON_CUDA = os.environ.get("ANNOTATED_LLAMA_TEST_DEVICE", "cpu").startswith("cuda")

F32_ABS = 1e-4
F32_TIE = 1e-4  # float32 on another device: only near ties may flip
BF16_REL = 0.02


def _random_model(name, seed=0, **kw) -> Transformer:
    # randomised norm gains (HF and a fresh model start them at 1): the scaling is checked too
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name, **kw))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _on(model: Transformer, device, dtype=None) -> Transformer:
    """A copy of `model` on `device` (the CPU original stays the reference)."""
    out = copy.deepcopy(model).to(device)
    return out.to(dtype) if dtype is not None else out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref).abs().max() / (ref.max() - ref.min()))


@torch.no_grad()
def _greedy_reference(model: Transformer, prompt, n: int) -> list[int]:
    """Greedy tokens by recomputing the whole sequence each step (no KV cache), on the CPU."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]), cache=False)[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def _worst_deficit(model: Transformer, prompt, out) -> float:
    """How far below the best logit the path's own choices fall, under the CPU float32 model given
    the path's own prefix: max over steps of (max logit - logit of the chosen token) / logit range.
    0 for exact greedy; a rounding-flipped near tie scores below its tie's width. This holds at
    every step (not only at the first step where two paths part), so a broken
    path scores high wherever it picks a token the reference does not nearly prefer."""
    if not out:
        return 0.0
    logits = model(torch.tensor([list(prompt) + list(out[:-1])]), cache=False)[0, len(prompt) - 1:]  # (N, V)
    best, worst = logits.max(-1).values, logits.min(-1).values
    chosen = logits[torch.arange(len(out)), torch.tensor(out)]
    return float(((best - chosen) / (best - worst)).max())


@pytest.fixture(scope="module")
def bible():
    """The embedded default model (trained: confident greedy choices), its tokenizer, prompts.
    Its shapes suit CUDA's packed int4 kernel at group size 128 (in_features % 128 == 0; the
    704-wide w2 falls back to int8 there, as quantize_model does on any device)."""
    from annotated_llama.default_model import default_model_dir
    from annotated_llama.weights import load_model
    model, tok = load_model(default_model_dir(), dtype=torch.float32)  # the reference: float32 on the CPU
    prompts = ["In the beginning God created", "And Jesus said unto them,", "The LORD is my shepherd",
               "Blessed are the"]
    return model.eval(), tok, [tok.encode(p, bos=True, eos=False) for p in prompts]


def test_device_is_the_one_asked_for(device):
    model = _on(_random_model("tiny"), device)
    assert model.output.weight.device.type == device.type
    assert model.rope_freqs.device.type == device.type
    out = model(torch.zeros(1, 3, dtype=torch.long, device=device))
    assert out.device.type == device.type and out.dtype == torch.float32


# ---- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-llama3"])
def test_forward_logits_match_hf_on_cpu(device, name):
    # the reference: HF transformers' LlamaForCausalLM in float32 on the CPU
    import transformers

    from annotated_llama.weights.hf import hf_to_meta_state_dict
    args = ModelArgs.from_name(name)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_hf_config())).float().eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    tokens = torch.randint(0, args.vocab_size, (3, 80))  # past tiny-llama3's 64-token original context
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    ours = Transformer(args).eval()
    ours.load_state_dict(hf_to_meta_state_dict(hf.state_dict(), args))
    dev = _on(ours, device)
    with torch.no_grad():
        got = dev(tokens.to(device), cache=False).cpu()
        got_cached = dev(tokens.to(device)).cpu()  # prefill through the KV cache
        got_bf16 = _on(ours, device, torch.bfloat16)(tokens.to(device), cache=False)
    assert (got - ref).abs().max() < F32_ABS
    assert (got_cached - ref).abs().max() < F32_ABS
    assert got_bf16.dtype == torch.float32  # logits stay float32 whatever the weights
    err = _rel(got_bf16, ref)
    print(f"{name} on {device}: float32 max abs error {(got - ref).abs().max():.1e}, bfloat16 {err:.3f} of range")
    assert err < BF16_REL, err


@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-llama3"])
def test_prefill_then_decode_equals_full_forward(device, name):
    model = _random_model(name, seed=2)
    tokens = torch.randint(0, model.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(tokens, cache=False)  # CPU, no cache
        dev = _on(model, device)
        t = tokens.to(device)
        full = dev(t, cache=False)
        steps = [dev(t[:, :17], 0), dev(t[:, 17:25], 17)]  # prefill, then a chunk (chunked-prefill mask)
        steps += [dev(t[:, i:i + 1], i) for i in range(25, 40)]  # then one token at a time
    incremental = torch.cat(steps, dim=1)
    assert incremental.device.type == device.type
    assert (incremental - full).abs().max() < 2e-5  # same device: only the kernels' rounding differs
    assert (incremental.cpu() - ref).abs().max() < F32_ABS


def test_ragged_rows_on_the_paged_cache(device):
    from annotated_llama.core.kv_cache import KVCache
    model = _random_model("tiny-gqa", seed=3)
    a, b = torch.randint(0, 512, (12,)), torch.randint(0, 512, (5,))
    tokens = torch.zeros(2, 12, dtype=torch.long)
    tokens[0], tokens[1, :5] = a, b  # b right-padded: its padding writes the scratch block
    with torch.no_grad():
        alone_a = model(torch.cat([a, torch.tensor([3])])[None], cache=False)  # CPU references
        alone_b = model(torch.cat([b, torch.tensor([4])])[None], cache=False)
        dev = _on(model, device)
        cache = KVCache.for_model(dev, max_tokens=64, block_size=4)
        out = dev.step(tokens.to(device), torch.arange(12, device=device).expand(2, 12),
                       cache.plan(["a", "b"], [0, 0], [12, 5], 12)).cpu()
        nxt = dev.step(torch.tensor([[3], [4]], device=device), torch.tensor([[12], [5]], device=device),
                       cache.plan(["a", "b"], [12, 5], [1, 1], 1)).cpu()
    assert torch.isfinite(out).all()
    assert (out[0] - alone_a[0, :12]).abs().max() < F32_ABS
    assert (out[1, :5] - alone_b[0, :5]).abs().max() < F32_ABS
    assert (nxt[0, 0] - alone_a[0, 12]).abs().max() < F32_ABS
    assert (nxt[1, 0] - alone_b[0, 5]).abs().max() < F32_ABS


# ---- generation -----------------------------------------------------------------------------

def test_llama_greedy_text_completion_equals_cpu(device, bible):
    # Llama.build loads the default model onto each device; the CPU's float32 model is the reference.
    # float32 on both (the default model is stored as bfloat16, whose rounding differs by device)
    from annotated_llama.inference.generation import Llama
    model, _, ids = bible
    cpu, dev = Llama.build(device="cpu", dtype="float32"), Llama.build(device=device, dtype="float32")
    assert dev.model.output.weight.device.type == device.type
    ref, _ = cpu.generate(ids, 24, temperature=0)
    got, _ = dev.generate(ids, 24, temperature=0)  # one ragged batch
    for p, a, b in zip(ids, got, ref):
        assert _worst_deficit(model, p, a) < F32_TIE, (p, a, b)
    prompts = [cpu.tokenizer.decode(p) for p in ids]
    texts = [r["generation"] for r in dev.text_completion(prompts, temperature=0, max_gen_len=24)]
    ref_texts = [r["generation"] for r in cpu.text_completion(prompts, temperature=0, max_gen_len=24)]
    for a, b, ta, tb in zip(got, ref, texts, ref_texts):
        if a == b:
            assert ta == tb and ta.strip()
    assert sum(a == b for a, b in zip(got, ref)) >= 3  # float32 near ties are rare: rows agree exactly


# ---- the engine's backends at each precision ---------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-gqa", "tiny-llama3"])
def test_engine_float32_greedy_on_random_models(device, name):
    from annotated_llama.inference.engine import Engine
    from annotated_llama.core.sampling import SamplingParams
    model = _random_model(name, seed=4)
    engine = Engine(_on(model, device), NumberVocab(model.params.vocab_size), runner=None)
    prompts = [[1, 5, 9, 33, 2], [7, 8], [100] * 9]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [engine.run([p], params)[0].output for p in prompts]
    batched = [s.output for s in engine.run(prompts, params)]  # ragged, continuous
    for p, a, b in zip(prompts, alone, batched):
        assert len(a) == len(b) == 20
        assert _worst_deficit(model, p, a) < F32_TIE, ("alone", p)
        assert _worst_deficit(model, p, b) < F32_TIE, ("batched", p)



# Per-step deficits measured on a CPU (default model, 4 prompts x 32 tokens): bfloat16 0.003,
# int8 0.002, int4 0.026; a sign-flipped wq in one layer or rotary sin scored 0.07 to 0.5.
TIE = {"float32": F32_TIE, "bfloat16": 0.02, "int8": 0.02, "int4": 0.08}


def _check_greedy(bible, device, mode, backend):
    import copy

    from annotated_llama.inference.generation import Llama
    from annotated_llama.transforms.quantize import quantize_model
    model, tok, prompts = bible
    dev = copy.deepcopy(_on(model, device))
    if mode == "bfloat16":
        dev = dev.to(torch.bfloat16)
    elif mode in ("int8", "int4"):
        quantize_model(dev, mode)
    llama = Llama(dev, tok, backend=backend)
    alone = [llama.generate([p], 24, temperature=0, ignore_eos=True)[0][0] for p in prompts]
    for p, out in zip(prompts, alone):
        assert len(out) == 24
        assert _worst_deficit(model, p, out) < TIE[mode], (mode, backend, p, out)
    for p, out in zip(prompts, llama.generate(prompts, 24, temperature=0, ignore_eos=True)[0]):  # a ragged batch
        assert _worst_deficit(model, p, out) < TIE[mode], (mode, backend, "batched", p, out)
    exact = sum(out == _greedy_reference(model, p, 24) for p, out in zip(prompts, alone))
    assert mode != "float32" or exact >= 3, exact  # float32: the very tokens, bar a rare near tie


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8", "int4"])
def test_eager_greedy_on_the_default_model(bible, device, mode):
    _check_greedy(bible, device, mode, "eager")


# ---- quantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode,bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_within_bounds(bible, device, mode, bound):
    model, tok, _ = bible
    x = torch.tensor([tok.encode("Then the LORD spoke to Moses, saying, Speak to the children of Israel, "
                                 "and say to them: when a man among you brings an offering", bos=True, eos=False)])
    T = x.shape[1]
    with torch.no_grad():
        ref = model(x, cache=False)  # CPU float32
        q_cpu = quantize_model(copy.deepcopy(model), mode, group_size=128)(x, cache=False)
        qm = quantize_model(_on(model, device), mode, group_size=128)  # quantized on the device
        kinds = {type(m) for m in qm.modules()}
        got = qm(x.to(device), cache=False)
        cached = torch.cat([qm(x[:, :T // 2].to(device), 0), qm(x[:, T // 2:].to(device), T // 2)], 1)
    assert (Int4Linear if mode == "int4" else Int8Linear) in kinds
    assert got.device.type == device.type
    err, err_cpu = _rel(got, ref), _rel(got, q_cpu)
    print(f"{mode} on {device}: {err:.3f} of range from float32, {err_cpu:.4f} from the CPU's {mode}")
    assert err < bound, err
    assert err_cpu < 0.02, err_cpu  # the same integers and scales on both devices: bf16 rounding only
    assert _rel(cached, got.cpu()) < 0.02


def test_int4_on_inputs_of_64(device):
    # the tiny preset's in_features (64) with group_size 32. CPU's int4 kernel takes them; CUDA's
    # packing wants in_features % (16 * inner k-tiles) == 0, so on CUDA such a layer must either be
    # packed with fewer inner k-tiles or fall back to int8: anything but an error or garbage
    model = _random_model("tiny", seed=5)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        ref = model(x, cache=False)
        qm = quantize_model(_on(model, device), "int4", group_size=32)
        got = qm(x.to(device), cache=False)
    kinds = {type(m) for m in qm.modules()}
    assert torch.nn.Linear not in kinds and kinds & {Int4Linear, Int8Linear}  # every Linear quantized
    if device.type == "cpu":
        assert isinstance(qm.layers[0].attention.wq, Int4Linear)
    assert _rel(got, ref) < 0.15


# ---- LoRA and training ----------------------------------------------------------------------

def test_lora_forward_and_merge(device):
    from annotated_llama.transforms.lora import apply_lora, lora_modules, merge_and_unload, merge_lora, unmerge_lora
    model = _random_model("tiny-gqa", seed=6)
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        base = model(x, cache=False)
    apply_lora(model, "all", r=4, alpha=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    dev = _on(model, device)
    assert all(m.lora_A.device.type == device.type for m in lora_modules(dev).values())
    with torch.no_grad():
        ref = model(x, cache=False)  # CPU, unmerged: W x + (alpha / r) B A x
        unmerged = dev(x.to(device), cache=False).cpu()
        merge_lora(dev)
        merged = dev(x.to(device), cache=False).cpu()
        unmerge_lora(dev)
        back = dev(x.to(device), cache=False).cpu()
        plain = merge_and_unload(dev)(x.to(device), cache=False).cpu()
    assert (ref - base).abs().max() > 1e-2  # the adapters do change the logits
    for got in (unmerged, merged, back, plain):
        assert (got - ref).abs().max() < F32_ABS


def _train_once(device, dtype, out_dir):
    from annotated_llama.train.loop import TrainConfig, token_loss_eval, train
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny", vocab_size=256))
    text = torch.tensor(list((ROOT / "annotated_llama" / "core" / "model.py").read_bytes()[:4000]), dtype=torch.long)
    windows = text[: 31 * 65].view(31, 65)  # (31, 65)
    batches = [(windows[i:i + 4, :-1], windows[i:i + 4, 1:]) for i in (0, 4, 8)]
    val = [(windows[20:28, :-1], windows[20:28, 1:])]
    cfg = TrainConfig(out_dir=str(out_dir), max_steps=3, lr=1e-2, warmup_steps=1, dtype=dtype, device=str(device),
                      log_every=1, progress=False)
    return train(model.to(device), batches, cfg, evaluate=token_loss_eval(val))


def test_train_steps_match_cpu(device, tmp_path):
    # three AdamW steps (float32) and the validation loss after them: the device's numbers are the CPU's
    ref = _train_once("cpu", "float32", tmp_path / "cpu")
    got = _train_once(device, "float32", tmp_path / "dev")
    assert abs(got["loss"] - ref["loss"]) < 1e-4 * ref["loss"]
    assert abs(got["val_loss"] - ref["val_loss"]) < 1e-4 * ref["val_loss"]
    assert ref["val_loss"] < 5.5  # it learned something (uniform over 256 bytes is 5.55)
    assert Path(got["checkpoint"]).is_dir()
    # bfloat16 autocast (weights float32) on the device: within 2% of the float32 run's losses
    mixed = _train_once(device, "bfloat16", tmp_path / "bf16")
    assert abs(mixed["val_loss"] - ref["val_loss"]) < 0.02 * ref["val_loss"]


# ---- the compiled decode step: last (compiling takes the longest) ----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["float32", "bfloat16"] if not ON_CUDA else ["bfloat16", "int8", "int4"])
def test_compiled_greedy_on_the_default_model(bible, device, mode):
    _check_greedy(bible, device, mode, "compiled")


if not ON_CUDA and not os.environ.get("GPU_CHECK_RUNNING"):  # not from inside the script itself
    @pytest.mark.slow
    def test_gpu_check_script_dry_run(tmp_path):
        # bench/gpu_check.sh's CPU dry run (tiny preset, no compile, one test selected): every part
        # runs and writes what the GPU run's caller will read back
        import json
        import subprocess
        env = {**os.environ, "GPU_CHECK_SMALL": "1", "OUT": str(tmp_path),
               "GPU_CHECK_PYTEST_ARGS": "tests/inference/test_device.py::test_device_is_the_one_asked_for"}
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        files = {p.name for p in tmp_path.iterdir()}
        assert {"env.txt", "pytest.log", "junit.xml", "bench.log", "gpu_7b.json", "summary.txt"} <= files
        assert len(files) <= 8  # what comes back from the GPU machine
        assert "1 passed" in (tmp_path / "pytest.log").read_text()
        result = json.loads((tmp_path / "gpu_7b.json").read_text())
        runs = result["results"]
        assert [(r["mode"], r["compile"]) for r in runs] == [("bfloat16", False), ("int8", False), ("int4", False)]
        assert all(r["decode_tok_s"] > 0 and r["same_tokens_each_call"] for r in runs), runs
        summary = (tmp_path / "summary.txt").read_text()
        assert "pytest (exit 0)" in summary and "gpu_7b.py (exit 0)" in summary
