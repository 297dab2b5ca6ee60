"""The engines bench_engines.py and paired_decode.py time, each behind one call:
`generate(prompts, n)` -> (new tokens per row, seconds to the first token, seconds for the other n - 1).

    ours        annotated_llama's public API: `Llama.build(dir, dtype=...)`, then `Llama.generate(prompts,
                max_gen_len=n, temperature=0, ignore_eos=True)`. Llama.generate does not report its
                first token's time, so generate() times calls making k=1 (three, median) and k=n new
                tokens: the first token takes t(1), the other n - 1 take t(n) - t(1).
    HF          a minimal greedy loop over transformers' `LlamaForCausalLM` with past_key_values
                (less overhead than HF's `generate`, so the stricter reference).
    llama.cpp   llama-cpp-python's `Llama.eval` one token at a time, argmax of its logits in place.
Their checkpoints are the exports bench_engines.py writes into its --workdir. Also here: the
float32 reference their greedy tokens are checked against.
"""

from __future__ import annotations

import time
from pathlib import Path


class OursEngine:
    """Our public API: Llama.build, then Llama.generate (greedy, ignore_eos)."""

    def __init__(self, wd: Path, precision: str, max_batch_size: int = 16):
        from annotated_llama import Llama
        if precision in ("int8", "int4"):  # load_model recognises a quantized dir
            self.llm = Llama.build(wd / f"ours-{precision}", max_batch_size=max_batch_size)
        else:
            self.llm = Llama.build(wd / "ours", dtype=precision, max_batch_size=max_batch_size)

    def backend(self) -> dict:
        """Diagnostics only (read, never relied on): the engine's runner class, whether a compiled
        step is ready, and its compiled / eager call counts, where the runner has them."""
        runner = getattr(getattr(self.llm, "_engine", None), "runner", None)
        if runner is None:
            return {}
        out = {"runner": type(runner).__name__}
        ready = getattr(runner, "ready", None)
        if hasattr(ready, "is_set"):
            out["compiled_ready"] = ready.is_set()
        if isinstance(getattr(runner, "error", None), str):
            out["compile_error"] = runner.error
        if isinstance(getattr(runner, "calls", None), dict):
            out["calls"] = dict(runner.calls)
        return out

    def run(self, prompts, n):
        out, _ = self.llm.generate(prompts, max_gen_len=n, temperature=0, ignore_eos=True)
        if any(len(row) != n for row in out):
            raise RuntimeError(f"Llama.generate made {[len(r) for r in out]} tokens, asked {n} (ignore_eos)")
        return out

    def generate(self, prompts, n):
        """(new tokens per row, seconds to the first token, seconds for the other n - 1)."""
        if n == 1:  # one call, timed as it comes (the first after loading is the cold one)
            t0 = time.perf_counter()
            out = self.run(prompts, 1)
            return out, time.perf_counter() - t0, 0.0
        firsts = []
        for _ in range(3):  # t(1): the median of three calls (a short prefill is the noisiest part)
            t0 = time.perf_counter()
            self.run(prompts, 1)
            firsts.append(time.perf_counter() - t0)
        first = sorted(firsts)[1]
        t0 = time.perf_counter()
        out = self.run(prompts, n)
        rest = time.perf_counter() - t0 - first
        if rest <= 0:
            raise RuntimeError(f"t({n}) = {rest + first:.4f} s <= t(1) = {first:.4f} s: too few new tokens to "
                               "time the decode on this machine (raise --new-tokens / --batched-new)")
        return out, first, rest


class HFEngine:
    def __init__(self, wd: Path, precision: str):
        import torch
        from transformers import LlamaForCausalLM
        self.torch = torch
        self.model = LlamaForCausalLM.from_pretrained(wd / "hf", dtype=getattr(torch, precision)).eval()

    def generate(self, prompts, n):
        torch = self.torch
        with torch.no_grad():  # the minimal HF loop: forward with past_key_values, argmax
            t0 = time.perf_counter()
            out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)
            t1 = time.perf_counter()
            toks = [tok]
            for _ in range(n - 1):
                out = self.model(tok[:, None], past_key_values=out.past_key_values, use_cache=True)
                tok = out.logits[:, -1].argmax(-1)
                toks.append(tok)
        return torch.stack(toks, 1).tolist(), t1 - t0, time.perf_counter() - t1


class LlamaCppEngine:
    def __init__(self, wd: Path, precision: str, threads: int, n_ctx: int = 1024):
        import numpy as np
        from llama_cpp import Llama
        self.np = np
        self.llm = Llama(model_path=str(wd / f"model-{precision}.gguf"), n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                         n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)

    def _argmax_last(self) -> int:
        # with logits_all=False, Llama.eval no longer copies logits into .scores: read
        # llama.cpp's buffer for the last token in place (no copy)
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))
        return int(logits.argmax())

    def generate(self, prompts, n):
        llm = self.llm
        (prompt,) = prompts
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = self._argmax_last()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = self._argmax_last()
            out.append(tok)
        return [out], t1 - t0, time.perf_counter() - t1


def load_engine(family: str, precision: str, wd: Path, threads: int, max_batch_size: int = 16,
                n_ctx: int = 1024):
    if family == "ours":
        return OursEngine(wd, precision, max_batch_size=max_batch_size)
    if family == "hf":
        return HFEngine(wd, precision)
    return LlamaCppEngine(wd, precision, threads, n_ctx=n_ctx)


# ---- the reference: greedy float32 through Meta's forward contract ---------------------------

def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of the float32 model through Meta's forward(tokens, start_pos) contract."""
    import torch
    with torch.inference_mode():
        tok = int(model(torch.tensor([prompt]), 0)[0, -1].argmax())
        out = [tok]
        for i in range(n - 1):
            tok = int(model(torch.tensor([[tok]]), len(prompt) + i)[0, -1].argmax())
            out.append(tok)
    return out


def agreement(model, prompt, tokens, ref, tol) -> tuple[str, bool]:
    import torch
    j = next((i for i, (x, y) in enumerate(zip(tokens, ref)) if x != y), None)
    if j is None:
        return ("exact", True) if len(tokens) == len(ref) else (f"length {len(tokens)}", False)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ref[:j]]), 0)[0, -1]
    top2 = logits.topk(2).values
    gap = float((top2[0] - top2[1]) / (logits.max() - logits.min()))
    if gap < tol:
        return f"to token {j} (then a near-tie: gap {gap:.1e})", True
    return f"DIFFERS at token {j} (gap {gap:.1e})", False
