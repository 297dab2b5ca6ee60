"""`Llama`: Meta's generation front end (llama/generation.py, v2 API), batched properly.

Meta's algorithm (REFERENCE b6) right-pads the prompts into one (B, total_len) grid and runs the
model from the shortest prompt's end, one position per call for every row: a row whose prompt is
longer is "teacher-forced" (its sampled token thrown away, its next prompt token fed instead).
So the rest of each longer prompt is prefilled one token per forward call, and every row costs
work until the last row finishes. Ours:

  prefill   all prompts in ONE forward call: right-padded to the longest, causal attention. Row b
            writes its K/V into cache slots [0, len_b); the padding after it is garbage that no
            real token ever attends to (causal mask), and the decode steps overwrite it.
  decode    one token per active row per call, each row at its own cache slot
            (`model(tokens, start_pos=LongTensor[B])`, the per-row-slot path of model.py);
            the position of a token is its slot, so a row's numbers do not depend on its
            neighbours: a ragged batch gives, row for row, what each prompt gives alone.
  finish    a row leaves the batch (its cache row swapped behind the active ones) the moment it
            samples a stop id, spends its budget, or (text_completion) its text hits a stop string.

`mode="meta"` runs Meta's token-at-a-time teacher-forced loop instead, for comparison and tests.
`Llama.forward_calls` counts the model calls either way.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, List, Optional

import torch
import torch.nn.functional as F

from .chat_format import TEMPLATE_STOPS, Dialog, encode_dialog
from .sampling import check_sampling_args, make_generator, sample, token_presence
from .streaming import TextStream, check_stops
from .tokenizer import Tokenizer


class Llama:
    def __init__(self, model, tokenizer: Tokenizer, seed: int = 1, max_batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        # Meta calls torch.manual_seed(seed) in build; we keep our own generator instead of
        # touching the global RNG. Calls without a `seed=` continue this stream, as Meta's do.
        self.generator = make_generator(seed, self.device)
        self.forward_calls = 0  # model calls made so far (tests and benchmarks read it)
        self.prefill_chunk = 512  # prompt positions per prefill call (bounds the logits' memory)

    @staticmethod
    def build(ckpt_dir=None, tokenizer_path=None, max_seq_len: int = 2048, max_batch_size: int = 8,
              dtype=None, device="cpu", seed: int = 1, lora=None) -> "Llama":
        """Load a checkpoint (anything `load_model` accepts; None: the embedded default model).
        max_seq_len caps the context (and the KV cache) below the model's trained context; it
        never extends it."""
        from .weights import load_model  # lazily: weights pull in gguf/safetensors readers

        if ckpt_dir is None:
            from .default_model import default_model_dir
            ckpt_dir = default_model_dir()
        model, tokenizer = load_model(ckpt_dir, dtype=dtype, device=device, lora=lora)
        if tokenizer_path is not None:
            tokenizer = Tokenizer(tokenizer_path)
        if tokenizer is None:
            raise ValueError(f"{ckpt_dir}: no tokenizer.model found beside the weights; pass tokenizer_path")
        if tokenizer.n_words > model.params.vocab_size:
            raise ValueError(f"{tokenizer.path}: tokenizer has {tokenizer.n_words} ids but the model at "
                             f"{ckpt_dir} only {model.params.vocab_size}")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        if max_seq_len < model.params.max_seq_len:
            set_context_length(model, max_seq_len)
        return Llama(model, tokenizer, seed=seed, max_batch_size=max_batch_size)

    @property
    def max_seq_len(self) -> int:
        return self.model.params.max_seq_len

    def _forward(self, tokens, start_pos):
        self.forward_calls += 1
        return self.model(tokens, start_pos)

    # ---- Meta's v2 API ----------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt_tokens: List[List[int]], max_gen_len: Optional[int] = None,
                 temperature: float = 0.6, top_p: float = 0.9, logprobs: bool = False, echo: bool = False, *,
                 top_k: Optional[int] = None, repetition_penalty: float = 1.0, ignore_eos: bool = False,
                 seed: Optional[int] = None, mode: str = "batched"):
        """Meta's return value: (generation_tokens, generation_logprobs or None), a list per
        prompt, cut before the first stop id. `seed` (ours): fresh generators for this call, row
        i seeded with seed + i, so the same call gives the same samples."""
        if mode == "meta":
            return self._generate_meta(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo,
                                       top_k=top_k, repetition_penalty=repetition_penalty,
                                       ignore_eos=ignore_eos, seed=seed)
        if mode != "batched":
            raise ValueError(f"mode must be 'batched' or 'meta', got {mode!r}")
        out_tokens = [[] for _ in prompt_tokens]
        out_logprobs = [[] for _ in prompt_tokens]
        for row, token, logprob in self._decode(prompt_tokens, max_gen_len, temperature, top_p, top_k,
                                                repetition_penalty, ignore_eos, seed, echo and logprobs):
            if token is not None:  # None: the log-probability of a prompt token (echo)
                out_tokens[row].append(token)
            out_logprobs[row].append(logprob)
        if echo:
            out_tokens = [list(p) + t for p, t in zip(prompt_tokens, out_tokens)]
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, echo: bool = False, *,
                        top_k: Optional[int] = None, repetition_penalty: float = 1.0, stop=None,
                        ignore_eos: bool = False, seed: Optional[int] = None):
        """[{"generation": str}] (+ "tokens", "logprobs" with logprobs), one per prompt; the
        text ends before the first stop string, and generation stops there too."""
        if isinstance(prompts, str):
            raise TypeError("text_completion takes a list of prompts; use [prompt] for one")
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        return self._complete(prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty,
                              check_stops(stop), ignore_eos, seed, logprobs, echo, prompts)

    def chat_completion(self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: Optional[int] = None, logprobs: bool = False, *,
                        template: str = "llama-2", top_k: Optional[int] = None, repetition_penalty: float = 1.0,
                        stop=None, seed: Optional[int] = None):
        """[{"generation": {"role": "assistant", "content": str}}] per dialog (Meta's shape)."""
        prompt_tokens = [encode_dialog(self.tokenizer, d, template) for d in dialogs]
        stops = check_stops(stop) + TEMPLATE_STOPS[template]
        results = self._complete(prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty,
                                 stops, False, seed, logprobs, False, None)
        for r in results:  # the space after "[/INST]" (Meta's decode drops it) and before a template stop
            r["generation"] = {"role": "assistant", "content": r["generation"].strip()}
        return results

    def stream(self, prompt: str, *, max_gen_len: Optional[int] = None, temperature: float = 0.6,
               top_p: float = 0.9, top_k: Optional[int] = None, repetition_penalty: float = 1.0, stop=None,
               ignore_eos: bool = False, seed: Optional[int] = None) -> Iterator[str]:
        """Text pieces as they are generated (whole characters only; nothing of a stop string).
        Their concatenation equals text_completion([prompt])'s generation for the same seed."""
        ids = self.tokenizer.encode(prompt, bos=True, eos=False)
        for _, piece in self.stream_tokens(ids, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p,
                                           top_k=top_k, repetition_penalty=repetition_penalty, stop=stop,
                                           ignore_eos=ignore_eos, seed=seed):
            if piece:
                yield piece

    def stream_tokens(self, prompt_tokens: List[int], *, max_gen_len: Optional[int] = None,
                      temperature: float = 0.6, top_p: float = 0.9, top_k: Optional[int] = None,
                      repetition_penalty: float = 1.0, stop=None, ignore_eos: bool = False,
                      seed: Optional[int] = None) -> Iterator[tuple[Optional[int], str]]:
        """(token id, text piece) per generated token from already-encoded prompt ids (e.g. a chat
        template's); the piece may be "" while a character or a possible stop string is held
        back. A final (None, rest) carries whatever was held at the end."""
        text = TextStream(self.tokenizer, prompt_tokens, check_stops(stop))
        finished: set = set()
        for _, token, _ in self._decode([prompt_tokens], max_gen_len, temperature, top_p, top_k,
                                        repetition_penalty, ignore_eos, seed, False, finished):
            piece = text.push(token)
            if text.stopped:
                finished.add(0)
            yield token, piece
        tail = text.flush()
        if tail:
            yield None, tail

    # ---- the batched engine ------------------------------------------------------------------

    def _complete(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty, stops,
                  ignore_eos, seed, logprobs, echo, prompts):
        streams = [TextStream(self.tokenizer, p, stops) for p in prompt_tokens]
        texts = [[] for _ in prompt_tokens]
        toks = [[] for _ in prompt_tokens]
        lps = [[] for _ in prompt_tokens]
        finished: set = set()
        for row, token, lp in self._decode(prompt_tokens, max_gen_len, temperature, top_p, top_k,
                                           repetition_penalty, ignore_eos, seed, False, finished):
            texts[row].append(streams[row].push(token))
            toks[row].append(token)
            lps[row].append(lp)
            if streams[row].stopped:
                finished.add(row)
        results = []
        for i, s in enumerate(streams):
            text = "".join(texts[i]) + s.flush()
            r = {"generation": (prompts[i] + text) if echo else text}
            if logprobs:  # Meta: the decoded piece of every generated token, and its log-probability
                r["tokens"] = [self.tokenizer.decode([t]) for t in toks[i]]
                r["logprobs"] = lps[i]
            results.append(r)
        return results

    def check_request(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty):
        """Raise ValueError for a bad request; else each prompt's budget of new tokens."""
        if not isinstance(prompt_tokens, (list, tuple)) or len(prompt_tokens) == 0:
            raise ValueError("empty batch: pass at least one prompt")
        check_sampling_args(temperature, top_p, top_k, repetition_penalty)
        if max_gen_len is not None and (not isinstance(max_gen_len, int) or max_gen_len < 1):
            raise ValueError(f"max_gen_len must be an integer >= 1 (or None for the rest of the context), "
                             f"got {max_gen_len!r}")
        for i, p in enumerate(prompt_tokens):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: it needs at least one token (e.g. BOS)")
            if len(p) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens but the context is {self.max_seq_len} tokens: "
                                 "no room to generate (shorten the prompt or raise max_seq_len)")
            if min(p) < 0 or max(p) >= self.model.params.vocab_size:
                raise ValueError(f"prompt {i} has a token id outside [0, {self.model.params.vocab_size})")
        # a row's budget depends only on its own prompt, so batching cannot change it
        return [min(max_gen_len or self.max_seq_len, self.max_seq_len - len(p)) for p in prompt_tokens]

    def _generators(self, seed, n):
        if seed is None:
            return self.generator
        return [make_generator(seed + i, self.device) for i in range(n)]

    @torch.inference_mode()
    def _decode(self, prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty, ignore_eos,
                seed, prompt_logprobs, finished: Optional[set] = None):
        """Yields (row, token, logprob) for every generated token, step by step; stop ids are not
        yielded. Rows put in `finished` by the consumer leave the batch before the next step."""
        budgets = self.check_request(prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty)
        finished = set() if finished is None else finished
        generators = self._generators(seed, len(prompt_tokens))
        for start in range(0, len(prompt_tokens), self.max_batch_size):
            rows = list(range(start, min(start + self.max_batch_size, len(prompt_tokens))))
            gens = generators if isinstance(generators, torch.Generator) or generators is None \
                else [generators[r] for r in rows]
            yield from self._decode_chunk(rows, [prompt_tokens[r] for r in rows], [budgets[r] for r in rows],
                                          temperature, top_p, top_k, repetition_penalty, ignore_eos, gens,
                                          prompt_logprobs, finished)

    def _decode_chunk(self, rows, prompts, budgets, temperature, top_p, top_k, repetition_penalty, ignore_eos,
                      generators, prompt_logprobs, finished):
        dev, V = self.device, self.model.params.vocab_size
        lengths = torch.tensor([len(p) for p in prompts], device=dev)  # (B,)
        B, L = len(prompts), int(lengths.max())
        padded = torch.full((B, L), -1, dtype=torch.long, device=dev)  # right-padded, -1 = nothing
        for b, p in enumerate(prompts):
            padded[b, :len(p)] = torch.tensor(p, device=dev)
        grid = padded.clamp(min=0)  # (B, L); the padding (id 0) is never attended by a real token
        penalize = repetition_penalty != 1.0
        presence = token_presence(padded, V) if penalize else None  # (B, V) for the repetition penalty
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), device=dev, dtype=torch.long)

        # Prefill every prompt together: one call for prompts up to `prefill_chunk` tokens, longer
        # ones in chunks (Meta v2's chunked-prefill mask), so the (B, T, V) logits stay bounded.
        logits = torch.empty(B, V, device=dev)  # each row's next-token logits
        prompt_lp = []
        for s in range(0, L, self.prefill_chunk):
            e = min(L, s + self.prefill_chunk)
            chunk = self._forward(grid[:, s:e], s)  # (B, e-s, V)
            if prompt_logprobs:  # echo + logprobs: log p(token j+1 | tokens <= j), Meta's convention
                target = grid[:, s + 1:e + 1]  # (B, <= e-s)
                prompt_lp.append(F.log_softmax(chunk[:, :target.shape[1]], -1).gather(2, target[..., None])[..., 0])
            here = ((lengths - 1 >= s) & (lengths - 1 < e)).nonzero()[:, 0]  # rows whose prompt ends here
            logits[here] = chunk[here, lengths[here] - 1 - s]
        if prompt_logprobs:  # position 0 has no prediction: Meta leaves it 0
            lp = torch.cat(prompt_lp, dim=1)  # (B, L-1)
            for b, p in enumerate(prompts):
                for j in range(len(p)):
                    yield rows[b], None, (0.0 if j == 0 else float(lp[b, j - 1]))

        row_ids = list(rows)  # the batch rows still active, as caller row numbers
        pos = lengths.clone()  # (B,) the slot each row's next token goes to
        n_gen = [0] * B
        budget = list(budgets)
        while True:
            next_tok = sample(logits, temperature, top_p, top_k, generator=generators, presence=presence,
                              repetition_penalty=repetition_penalty)  # (B,)
            logprob = F.log_softmax(logits, dim=-1).gather(1, next_tok[:, None])[:, 0]  # Meta v2: raw logits
            is_stop = torch.isin(next_tok, stop_ids) & (not ignore_eos)  # (B,)
            keep = []
            for b, (tok, lp, stop) in enumerate(zip(next_tok.tolist(), logprob.tolist(), is_stop.tolist())):
                if not stop:
                    yield row_ids[b], tok, lp
                    n_gen[b] += 1
                if not (stop or n_gen[b] >= budget[b] or row_ids[b] in finished):
                    keep.append(b)
            if not keep:
                return
            if penalize:
                presence[torch.arange(len(row_ids), device=dev), next_tok] = True
            if len(keep) < len(row_ids):  # drop finished rows, and their KV cache rows
                idx = torch.tensor(keep, device=dev)
                next_tok, pos, presence = next_tok[idx], pos[idx], (presence[idx] if penalize else None)
                row_ids = [row_ids[b] for b in keep]
                n_gen, budget = [n_gen[b] for b in keep], [budget[b] for b in keep]
                if isinstance(generators, list):
                    generators = [generators[b] for b in keep]
                retire_rows(self.model, keep, int(pos.max()))
            logits = self._forward(next_tok[:, None], pos)[:, 0]  # (B, V)
            pos = pos + 1

    # ---- Meta's reference loop ---------------------------------------------------------------

    @torch.inference_mode()
    def _generate_meta(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, *, top_k,
                       repetition_penalty, ignore_eos, seed):
        """meta-llama/llama generation.py (v2) `generate`, step for step (REFERENCE b6)."""
        self.check_request(prompt_tokens, max_gen_len, temperature, top_p, top_k, repetition_penalty)
        params, dev = self.model.params, self.device
        bsz = len(prompt_tokens)
        if max_gen_len is None:
            max_gen_len = params.max_seq_len - 1  # Meta's text_completion default
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        pad_id = -1
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=dev)
        for k, t in enumerate(prompt_tokens):
            tokens[k, :len(t)] = torch.tensor(t, dtype=torch.long, device=dev)
        token_logprobs = torch.zeros_like(tokens, dtype=torch.float)
        prev_pos = 0
        eos_reached = torch.tensor([False] * bsz, device=dev)
        input_text_mask = tokens != pad_id
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), device=dev, dtype=torch.long)
        generators = self._generators(seed, bsz)
        for cur_pos in range(min_prompt_len, total_len):
            logits = self._forward(tokens[:, prev_pos:cur_pos], prev_pos)
            presence = token_presence(tokens[:, :cur_pos], params.vocab_size) if repetition_penalty != 1.0 else None
            next_token = sample(logits[:, -1], temperature, top_p, top_k, generator=generators, presence=presence,
                                repetition_penalty=repetition_penalty)
            # teacher forcing: rows still inside their prompt take the prompt token
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none",
                    ignore_index=pad_id)
            if not ignore_eos:
                eos_reached |= ~input_text_mask[:, cur_pos] & torch.isin(next_token, stop_ids)
            prev_pos = cur_pos
            if all(eos_reached):
                break
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            toks = toks[start:len(prompt_tokens[i]) + max_gen_len]
            probs = token_logprobs[i][start:len(prompt_tokens[i]) + max_gen_len].tolist() if logprobs else None
            if not ignore_eos:
                for s in self.tokenizer.stop_ids:  # cut at the first stop id
                    if s in toks[len(prompt_tokens[i]) - start:]:
                        idx = toks.index(s, len(prompt_tokens[i]) - start)
                        toks = toks[:idx]
                        probs = probs[:idx] if logprobs else None
            toks = [t for t in toks if t != pad_id]  # positions never reached (early stop)
            out_tokens.append(toks)
            out_logprobs.append(probs[:len(toks)] if logprobs else None)
        return out_tokens, (out_logprobs if logprobs else None)


# ---- model surgery the generator needs ---------------------------------------------------------

def retire_rows(model, keep: List[int], length: int) -> None:
    """Move KV-cache rows `keep` (increasing) to the front, in order, swapping slots [0, length).
    The next forward call passes only len(keep) rows, and the model uses cache rows [0, B): the
    finished rows' work stops. In-place swaps, not a smaller copy, so under tensor parallelism
    the same swap can be mirrored on every rank (tensor_parallel.swap_cache_rows)."""
    swap = _swap_rows
    if getattr(model, "tp_world_size", 1) > 1:
        from .tensor_parallel import swap_cache_rows as swap
    for j, src in enumerate(keep):
        if src != j:  # keep[j] >= j, so a row moved out of the way is never needed again
            swap(model, j, src, length)


def _swap_rows(model, a: int, b: int, length: int) -> None:
    for layer in model.layers:
        for c in (layer.attention.cache_k, layer.attention.cache_v):  # (B, S_max, K, D)
            c[[a, b], :length] = c[[b, a], :length]


def set_context_length(model, max_seq_len: int) -> None:
    """Shrink the model's context to `max_seq_len` (rotary tables and KV cache follow). Never
    grows it: positions past the trained context were never seen in training."""
    if max_seq_len > model.params.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's trained context of "
                         f"{model.params.max_seq_len} tokens")
    model.params = dataclasses.replace(model.params, max_seq_len=max_seq_len)
    for layer in model.layers:
        layer.attention.max_seq_len = max_seq_len
    model.clear_cache()
    model.reset_rope()


__all__ = ["Llama", "retire_rows", "set_context_length"]
