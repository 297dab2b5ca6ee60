"""The compiled backend (annotated_llama/inference/backends.py) against the plain model: same tokens, same
logits within float rounding, for one row and for continuous batches."""

import threading

import pytest
import torch
import torch.nn.functional as F

from annotated_llama import ModelArgs, Transformer
from annotated_llama.core.model import attend_one
from annotated_llama.core.sampling import SamplingParams
from annotated_llama.inference import matvec
from annotated_llama.inference.backends import CompiledRunner, DecodeLinear, decode_view, make_runner, runner_state
from annotated_llama.inference.engine import Engine

from fixtures import NumberVocab, tiny_model



@pytest.mark.parametrize("H,K", [(8, 8), (8, 2), (8, 1)])
def test_written_out_attention_equals_sdpa(H, K):
    B, S, D = 3, 21, 16
    q, k, v = torch.randn(B, 1, H, D), torch.randn(B, S, K, D), torch.randn(B, S, K, D)
    lengths = torch.tensor([21, 7, 13])
    mask = (torch.arange(S) < lengths[:, None])[:, None, None]  # (B, 1, 1, S)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                          enable_gqa=True)  # (B, H, 1, D)
    got = attend_one(q, k, v, mask)  # (B, 1, H*D)
    torch.testing.assert_close(got, want.transpose(1, 2).reshape(B, 1, H * D), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [False, True])
def test_the_decode_view_shares_every_weight_and_leaves_the_model_alone(kernel):
    if kernel and not matvec.load():
        pytest.fail(f"the decode kernel did not build here: {matvec._state['error']}")
    model = tiny_model(0, "tiny-gqa")
    view = decode_view(model, kernel)
    assert all(type(m) is torch.nn.Linear for m in model.modules() if isinstance(m, torch.nn.Linear))
    linears = [m for m in view.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is DecodeLinear and m.kernel == kernel for m in linears)
    assert all(a is b for a, b in zip(model.parameters(), view.parameters()))  # the same tensors
    assert view.output.weight is model.output.weight and view.rope_freqs is model.rope_freqs
    with torch.no_grad():
        for rows in (1, 3, 16, 17):  # the kernel's sizes and a prefill-sized product
            x = torch.randn(rows, 1, 64)
            torch.testing.assert_close(view(x.argmax(-1), cache=False), model(x.argmax(-1), cache=False),
                                       rtol=1e-5, atol=1e-5)
    compiled = torch.compile(view.layers[0].attention.wq, fullgraph=True)
    x1 = torch.randn(1, 1, 64)
    with torch.no_grad():  # the kernel has no backward: the compiled step runs without autograd
        torch.testing.assert_close(compiled(x1), model.layers[0].attention.wq(x1), rtol=1e-5, atol=1e-5)


def test_the_decode_kernel_equals_a_float64_product_for_every_dtype_and_size():
    if not matvec.load():
        pytest.fail(f"the decode kernel did not build here: {matvec._state['error']}")
    torch.manual_seed(0)
    for dtype, bound in ((torch.float32, 2e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        for N, K in ((96, 64), (37, 100), (5, 1000), (8, 33)):  # K not a multiple of 16 or 32 too
            w = torch.randn(N, K).to(dtype)
            for M in (1, 2, 3, 4, 5, 8, 13, 16):
                x = torch.randn(M, K).to(dtype)
                want = x.double() @ w.double().T  # (M, N)
                got = matvec.matvec(x, w)
                assert got.dtype == dtype and got.shape == (M, N)
                assert float((got.double() - want).abs().max() / want.abs().max()) < bound, (dtype, N, K, M)


def test_tensor_parallel_and_eager_choices_never_compile():
    model = Transformer(ModelArgs.from_name("tiny"))
    assert make_runner(model, "eager") == model.step
    model.tp_world_size = 2
    assert make_runner(model, "compiled") == model.step  # rank 0's step broadcasts: not compiled
    with pytest.raises(ValueError, match="backend"):
        make_runner(model, "fastest")


@pytest.mark.slow  # one torch.compile of a tiny model (tens of seconds on 2 CPU cores)
def test_compiled_decode_equals_eager_for_one_row_and_continuous_batches():
    from annotated_llama.transforms.lora import apply_lora
    torch.manual_seed(0)
    model = Transformer(ModelArgs.from_name("tiny-gqa"))
    with torch.no_grad():
        model.output.weight.mul_(4)  # spread logits: no near-ties for rounding to flip
    apply_lora(model, "wq,wv", r=4)  # LoRA layers run inside the compiled graph too
    for name, p in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    model.eval()
    vocab = NumberVocab(model.params.vocab_size)
    prompts = [[1, 5, 9, 33, 2], [7, 8], [100] * 9, list(range(20, 60))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with torch.inference_mode():
        eager = [s.output for s in Engine(model, vocab, runner=model.step).run(prompts, params)]
        runner = CompiledRunner(model, background=False)
        assert runner.error is None and runner.ready.is_set()
        assert runner_state(runner) == {"decode": "compiled", "compile_error": None}
        graphs = dict(torch._dynamo.utils.counters["stats"])
        engine = Engine(model, vocab, runner=runner, max_batch_size=3)  # the 4th prompt joins mid-run
        compiled = [s.output for s in engine.run(prompts, params)]
        alone = [engine.run([p], params)[0].output for p in prompts]
        # the warm-up built every graph: no batch size or cache length since has compiled again
        assert dict(torch._dynamo.utils.counters["stats"]) == graphs
        # logits: the compiled step against the eager one at the same cache state
        seq = engine.add(prompts[1], params)[0]
        engine.step()
        batch = engine.cache.plan([seq.id], [seq.cached], [1], 1)
        args = (torch.tensor([[seq.next_token]]), torch.tensor([[seq.cached]]), batch, torch.tensor([0]))
        a, b = model.step(*args), runner(*args)
    assert compiled == eager == alone
    assert runner.calls["compiled"] > 50 and runner.calls["eager"] >= 1  # decode compiled, prefill eager
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)

    def fails(*args):
        raise RuntimeError("FailOnRecompileLimitHit: Hard failure due to fullgraph=True")
    runner.compiled = fails  # a graph that cannot be built at call time: the call runs eagerly
    with torch.inference_mode():
        assert [s.output for s in engine.run(prompts, params)] == eager
    assert runner.error.startswith("RuntimeError: FailOnRecompileLimitHit")
    assert runner_state(runner) == {"decode": "eager", "compile_error": runner.error}
    # "auto": the first call does not wait for the compile, it runs eagerly
    background = CompiledRunner(model, background=True)
    assert runner_state(background)["decode"] == "compiling"  # (a compile takes seconds at least)
    with torch.inference_mode():
        first = Engine(model, vocab, runner=background).run(prompts[:1], params.replace(max_tokens=3))
    assert first[0].output == eager[0][:3]
    background.ready.wait(600)
    assert runner_state(background)["decode"] == "compiled" and runner_state(model.step)["decode"] == "eager"
    assert background.error is None and not any(t.name == "annotated-llama-compile" and t.is_alive()
                                                for t in threading.enumerate())
