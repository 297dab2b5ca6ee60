"""What the tests share (not a test module; pytest fixtures built on these are in conftest.py).

The reference implementations every generation path is checked against:

- `meta_generate`: meta-llama/llama generation.py (v2) `generate`, step for step: prompts
  right-padded into one (B, total_len) grid, the model run from the shortest prompt's end one
  position per call for every row, rows inside their prompt teacher-forced, Meta's
  `forward(tokens, start_pos)` contract. Slow (every row pays until the last is done) and
  independent of the engine: the engine's batching must reproduce it row for row.
- `greedy_reference`: greedy decoding with no KV cache at all, one full forward per token.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

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


# ---- shared data and helpers of the training, fine-tuning, tokenizer and grammar tests ----------

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


TINY = {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": -1, "multiple_of": 16, "max_seq_len": 64}


RECORDS = [
    {"instruction": "Name the first book.", "input": "", "output": "Genesis"},
    {"instruction": "Reverse the order of this list.", "input": "bread, water, lamb", "output": "lamb, water, bread"},
    {"instruction": "What is 3 plus 4?", "input": "", "output": "7"},
    {"instruction": "What is the last word of this verse?", "input": "God saw the light.", "output": "light"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, friend."},
    {"instruction": "Count the words.", "input": "in the beginning", "output": "3"},
]


def cli(*args, check=True):
    """`annotated-llama ARGS` in this process (no torch import per call): (returncode, stdout, stderr)."""
    from annotated_llama.__main__ import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"exit {code}: {proc.stderr[-2000:]}")
    return proc


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def pretrain_args(shards, params_json, out, steps=12, *extra):
    return ["pretrain", "--data", shards, "--preset", params_json, "--out", out, "--max-steps", steps,
            "--batch-size", 2, "--seq-len", 32, "--lr", 3e-3, "--warmup-steps", 2, "--dtype", "float32",
            "--log-every", 1, "--eval-every", 6, "--eval-windows", 2, "--ckpt-every", 2, "--keep-checkpoints", 2,
            "--seed", 5, *extra]


def obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = {
    "nested": obj({"name": {"type": "string", "maxLength": 12},
                   "address": obj({"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                   "zip": {"type": "integer", "minimum": 1000, "maximum": 99999}}),
                   "tags": obj({"primary": {"type": "boolean"}})}),
    "enums": obj({"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]},
                  "ok": {"type": "boolean"}, "nothing": {"type": "null"}}),
    "arrays": obj({"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
                   "scores": {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
                              "maxItems": 3},
                   "pairs": {"type": "array", "maxItems": 2,
                             "items": obj({"k": {"type": "string", "maxLength": 3}, "v": {"type": "number",
                                                                                          "minimum": 0,
                                                                                          "maximum": 1}})}}),
    "integer-ranges": obj({"age": {"type": "integer", "minimum": 0, "maximum": 120},
                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                           "delta": {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
                           "big": {"type": "integer", "minimum": 100000, "maximum": 100005}}),
    "defs-anyof-nullable": {**obj({"kind": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/k"}]},
                                   "note": {"type": ["string", "null"], "maxLength": 5}}),
                            "$defs": {"k": {"enum": ["x", "y"]}}},
}


def golden_cases(stem):
    inputs = (DATA / f"{stem}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outputs = (DATA / f"{stem}.out").read_text(encoding="utf-8").split("\n")[:-1]
    assert len(inputs) == len(outputs) == 46
    return [(text, [int(i) for i in ids.split()]) for text, ids in zip(inputs, outputs)]


def random_strings(rng, n):
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ 0123456789 \t\n\r.,;:!?'\"()[]{}<>/\\|@#$%^&*-_=+~`"
                "éèüßøåçñ ÄÖÜ αβγδ абвгд 中文字 日本語 한국어 עברית العربية हिन्दी ")
    emoji = ["🦙", "👍🏽", "🇫🇷", "👨‍👩‍👧", "❤️", "\u200b", "\u0000", "\u0007", "\x7f", "\ufeff"]
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(0, 12)):
            r = rng.random()
            if r < 0.6:
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))))
            elif r < 0.8:
                parts.append(rng.choice(emoji))
            else:  # any valid code point, surrogates excluded
                cp = rng.randint(0, 0x10FFFF)
                parts.append(chr(cp) if not 0xD800 <= cp <= 0xDFFF else "x")
        out.append("".join(parts))
    return out
