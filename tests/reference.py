"""The reference implementations every generation path is checked against (not a test module).

- `meta_generate`: meta-llama/llama generation.py (v2) `generate`, step for step: prompts
  right-padded into one (B, total_len) grid, the model run from the shortest prompt's end one
  position per call for every row, rows inside their prompt teacher-forced, Meta's
  `forward(tokens, start_pos)` contract. Slow (every row pays until the last is done) and
  independent of the engine: the engine's batching must reproduce it row for row.
- `greedy_reference`: greedy decoding with no KV cache at all, one full forward per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from annotated_llama.core.sampling import sample, token_presence


@torch.inference_mode()
def meta_generate(model, tokenizer, prompt_tokens, max_gen_len=None, temperature=0.6, top_p=0.9, logprobs=False,
                  echo=False, *, top_k=None, repetition_penalty=1.0, ignore_eos=False, generator=None):
    """(tokens, logprobs or None) per prompt, exactly as Meta's loop computes them; also returns
    the number of forward calls it made."""
    params = model.params
    dev = model.tok_embeddings.weight.device
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
    prev_pos, calls = 0, 0
    eos_reached = torch.tensor([False] * bsz, device=dev)
    input_text_mask = tokens != pad_id
    stop_ids = torch.tensor(sorted(tokenizer.stop_ids), device=dev, dtype=torch.long)
    for cur_pos in range(min_prompt_len, total_len):
        logits = model(tokens[:, prev_pos:cur_pos].clamp(min=0), prev_pos)
        calls += 1
        presence = token_presence(tokens[:, :cur_pos], params.vocab_size) if repetition_penalty != 1.0 else None
        next_token = sample(logits[:, -1], temperature, top_p, top_k, generator=generator, presence=presence,
                            repetition_penalty=repetition_penalty)
        # teacher forcing: rows still inside their prompt take the prompt token
        next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
        tokens[:, cur_pos] = next_token
        if logprobs:
            token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=pad_id)
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
            for s in tokenizer.stop_ids:  # cut at the first stop id
                if s in toks[len(prompt_tokens[i]) - start:]:
                    idx = toks.index(s, len(prompt_tokens[i]) - start)
                    toks = toks[:idx]
                    probs = probs[:idx] if logprobs else None
        toks = [t for t in toks if t != pad_id]  # positions never reached (early stop)
        out_tokens.append(toks)
        out_logprobs.append(probs[:len(toks)] if logprobs else None)
    return out_tokens, (out_logprobs if logprobs else None), calls


@torch.inference_mode()
def greedy_reference(model, prompt, max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy new tokens with a full forward over the whole sequence for each (no cache); a stop
    id ends the list and is not part of it (Meta's rule)."""
    dev = model.tok_embeddings.weight.device
    seq, new = list(prompt), []
    for _ in range(max_new_tokens):
        tok = int(model(torch.tensor([seq], device=dev), cache=False)[0, -1].argmax())
        if tok in stop_ids:
            break
        new.append(tok)
        seq.append(tok)
    return new
