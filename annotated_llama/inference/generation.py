"""`Llama`: Meta's generation front end (meta-llama/llama generation.py, v2 API) over the engine.

Meta's `generate` right-pads the prompts into one (B, total_len) grid and runs the model from the
shortest prompt's end, one position per call for every row: the rest of each longer prompt is
"teacher-forced" one token per forward call, and every row costs work until the last row is done.
Here the same API adds each prompt to the engine (engine.py), which prefills all of them in one
ragged forward call and then decodes one token per running row per call, each row at its own
position in the paged KV cache and with its own generator, a row leaving the batch the moment it
finishes. So a ragged batch gives, row for row, exactly what each prompt gives alone. Meta's own
loop lives on in the tests (tests/reference.py) as the reference every path is checked against.

`Llama.forward_calls` counts the model calls.
"""

from __future__ import annotations

from typing import Iterator, List, Optional

import torch

from .. import load_model
from ..core.chat_format import TEMPLATE_STOPS, Dialog, encode_dialog
from ..core.model import set_context_length
from ..core.sampling import SamplingParams
from ..core.tokenizer import Tokenizer
from ..default_model import default_model_dir
from .backends import make_runner
from .engine import Engine


class Llama:
    def __init__(self, model, tokenizer: Tokenizer, seed: int = 1, max_batch_size: int = 8, *,
                 backend: str = "auto"):
        self.model = model.eval()
        self._engine: Optional[Engine] = None
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        # Meta calls torch.manual_seed(seed) in build; the engine keeps its own generator instead
        # of touching the global RNG. Calls without a `seed=` continue its stream, as Meta's do.
        self.seed = seed
        self.backend = backend

    @staticmethod
    def build(ckpt_dir=None, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 8,
              dtype=None, device="cpu", seed: int = 1, lora=None, backend: str = "auto") -> "Llama":
        """Load a checkpoint (anything `load_model` accepts; None: the embedded default model).
        max_seq_len caps the context (and the KV cache) below the model's trained context; it
        never extends it. backend: "auto" (the compiled decode step where it pays, see
        backends.py), "compiled" or "eager"."""

        if ckpt_dir is None:
            ckpt_dir = default_model_dir()
        model, tokenizer = load_model(ckpt_dir, dtype=dtype, device=device, lora=lora)
        if tokenizer_path is not None:
            tokenizer = Tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{ckpt_dir}: no tokenizer.model found beside the weights; pass tokenizer_path")
        tokenizer.check_fits(model.params.vocab_size, f"the model at {ckpt_dir}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        if max_seq_len < model.params.max_seq_len:
            set_context_length(model, max_seq_len)
        return Llama(model, tokenizer, seed=seed, max_batch_size=max_batch_size, backend=backend)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Tokenizer):  # another tokenizer (stop ids, vocabulary): another engine
        self._tokenizer, self._engine = tokenizer, None

    @property
    def max_seq_len(self) -> int:
        return self.model.params.max_seq_len

    @property
    def engine(self) -> Engine:
        """The engine every call runs on (built at first use, kept: its cache and compiled step
        are reused by later calls)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, max_batch_size=self.max_batch_size, seed=self.seed,
                                  runner=make_runner(self.model, self.backend, self.max_batch_size))
        return self._engine

    @property
    def forward_calls(self) -> int:
        return 0 if self._engine is None else self._engine.forward_calls

    def params(self, max_gen_len=None, temperature=0.6, top_p=0.9, top_k=None, repetition_penalty=1.0,
               ignore_eos=False, seed=None, stop=None, logprobs=False, echo=False, **extra) -> SamplingParams:
        """Meta's keyword arguments as the engine's SamplingParams (one check for every front end)."""
        if max_gen_len is not None and (isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int)
                                        or max_gen_len < 1):
            raise ValueError(f"max_gen_len must be an integer >= 1 (or None for the rest of the context), "
                             f"got {max_gen_len!r}")
        return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or 0, max_tokens=max_gen_len,
                              repetition_penalty=repetition_penalty, ignore_eos=ignore_eos, seed=seed,
                              stop=stop or (), logprobs=0 if logprobs else None, prompt_logprobs=bool(echo and logprobs),
                              **extra)

    def _run(self, prompt_tokens, params: SamplingParams, on_output=None):
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("empty batch: pass at least one prompt")
        prompts = [list(p) for p in prompt_tokens]
        for i, p in enumerate(prompts):  # every prompt checked before any runs
            try:
                self.engine.check(p, params)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        # row i of a seeded batch gets seed + i: the same call gives the same samples
        per_row = [params if params.seed is None else params.replace(seed=params.seed + i) for i in range(len(prompts))]
        with torch.inference_mode():
            return self.engine.run(prompts, per_row, on_output)

    # ---- Meta's v2 API ----------------------------------------------------------------------

    def generate(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                 temperature: float = 0.6, top_p: float = 0.9, logprobs: bool = False, echo: bool = False, *,
                 top_k: Optional[int] = None, repetition_penalty: float = 1.0, ignore_eos: bool = False,
                 seed: Optional[int] = None, **sampling):
        """Meta's return value: (generation_tokens, generation_logprobs or None), a list per
        prompt, cut before the first stop id. `seed` (ours): row i seeded with seed + i, so the
        same call gives the same samples. Further SamplingParams fields (presence_penalty,
        frequency_penalty, logit_bias, ...) pass through `sampling`."""
        if isinstance(prompt_tokens, str) or any(isinstance(p, str) or not all(hasattr(t, "__index__") for t in p)
                                                 for p in prompt_tokens):
            raise TypeError("generate takes token ids, a list of lists of ints (Meta's API); for text, use "
                            "text_completion or tokenizer.encode")
        params = self.params(max_gen_len, temperature, top_p, top_k, repetition_penalty, ignore_eos, seed,
                             logprobs=logprobs, echo=echo, **sampling)
        seqs = self._run(prompt_tokens, params)
        tokens = [(s.prompt if echo else []) + s.output for s in seqs]
        if not logprobs:
            return tokens, None
        # Meta's echo convention: the first prompt token has no prediction, its logprob is 0
        lps = [([0.0 if lp is None else lp for lp in s.prompt_logprobs] if echo else []) + s.logprobs for s in seqs]
        return tokens, lps

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, *,
                        top_k: Optional[int] = None, repetition_penalty: float = 1.0, stop=None,
                        ignore_eos: bool = False, seed: Optional[int] = None, **sampling):
        """[{"generation": str}] (+ "tokens", "logprobs" with logprobs), one per prompt; the
        text ends before the first stop string, and generation stops there too."""
        if isinstance(prompts, str):
            raise TypeError("text_completion takes a list of prompts; use [prompt] for one")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        params = self.params(max_gen_len, temperature, top_p, top_k, repetition_penalty, ignore_eos, seed, stop,
                             logprobs=logprobs, **sampling)
        return [self._result(s, logprobs, (p if echo else "")) for s, p in zip(self._run(prompt_tokens, params), prompts)]

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, *,
                        template: str = "llama-2", top_k: Optional[int] = None, repetition_penalty: float = 1.0,
                        stop=None, seed: Optional[int] = None, **sampling):
        """[{"generation": {"role": "assistant", "content": str}}] per dialog (Meta's shape)."""
        prompt_tokens = [encode_dialog(self.tokenizer, d, template) for d in dialogs]
        stops = tuple(stop or ()) + TEMPLATE_STOPS[template]
        params = self.params(max_gen_len, temperature, top_p, top_k, repetition_penalty, False, seed, stops,
                             logprobs=logprobs, **sampling)
        results = [self._result(s, logprobs) for s in self._run(prompt_tokens, params)]
        for r in results:  # the space after "[/INST]" (Meta's decode drops it) and before a template stop
            r["generation"] = {"role": "assistant", "content": r["generation"].strip()}
        return results

    def _result(self, s, logprobs: bool, prefix: str = "") -> dict:
        r = {"generation": prefix + s.generated_text()}
        if logprobs:  # Meta: the decoded piece of every generated token, and its log-probability
            r["tokens"] = [self.tokenizer.decode([t]) for t in s.output]
            r["logprobs"] = s.logprobs
        return r

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Text pieces as they are generated (whole characters only; nothing of a stop string).
        Their concatenation equals text_completion([prompt])'s generation for the same seed."""
        ids = self.tokenizer.encode(prompt, bos=True, eos=False)
        for _, piece in self.stream_tokens(ids, **sampling):
            if piece:
                yield piece

    def stream_tokens(self, prompt_tokens: List[int], *, max_gen_len: Optional[int] = None,
                      temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
                      repetition_penalty: float = 1.0, stop=None, ignore_eos: bool = False,
                      seed: Optional[int] = None, **sampling) -> Iterator[tuple[Optional[int], str]]:
        """(token id, text piece) per generated token from already-encoded prompt ids (e.g. a chat
        template's); the piece may be "" while a character or a possible stop string is held
        back. A final (None, rest) carries whatever was held at the end."""
        params = self.params(max_gen_len, temperature, top_p, top_k, repetition_penalty, ignore_eos, seed, stop,
                             **sampling)
        engine = self.engine
        (seq,) = engine.add(list(prompt_tokens), params)
        try:
            with torch.inference_mode():
                while not seq.done:
                    for out in engine.step():
                        if out.seq is seq and (out.token is not None or out.text):
                            yield out.token, out.text
        finally:  # the consumer stopped early: free the row
            engine.cancel(seq)


__all__ = ["Llama"]
