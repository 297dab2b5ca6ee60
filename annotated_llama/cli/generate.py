"""`annotated-llama generate [PROMPT]`: stream a completion to stdout (or print one JSON object).

The prompt comes from the argument or, when absent, from stdin. Speeds are measured the way
llama.cpp reports them: prefill = prompt tokens / time to the first sampled token, decode =
further tokens / the time after it.
"""

from __future__ import annotations

import json
import sys
import time

from ..core.chat_format import TEMPLATE_STOPS, TEMPLATES, encode_prompt


def add_sampling_arguments(p, max_new_tokens=256):
    """Flags shared by generate and chat (ranges checked by cli/argtypes.py)."""
    from . import argtypes

    p.add_argument("--model", help="checkpoint: Meta dir, HF dir, our dir or .gguf (default: the embedded model)")
    p.add_argument("--tokenizer", help="tokenizer.model or .gguf (default: the one beside the weights)")
    p.add_argument("--lora", help="PEFT-format LoRA adapter dir applied to the model")
    p.add_argument("--tp", type=argtypes.positive_int, default=1, metavar="N",
                   help="tensor-parallel ranks (needs torchrun)")
    p.add_argument("--device", type=argtypes.device, default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: as stored)")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only quantization applied after loading")
    p.add_argument("--max-seq-len", type=argtypes.positive_int, default=2048,
                   help="context cap (never above the model's)")
    p.add_argument("--max-new-tokens", type=argtypes.nonnegative_int, default=max_new_tokens, metavar="N",
                   help=f"most tokens to generate (default {max_new_tokens}; 0: up to the end of the context)")
    p.add_argument("--temperature", type=argtypes.temperature, default=0.6,
                   help="0 = greedy (default 0.6, at most 2)")
    p.add_argument("--top-p", type=argtypes.top_p, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=argtypes.top_k, default=None,
                   help="sample among the k most likely tokens only")
    p.add_argument("--repetition-penalty", type=argtypes.repetition_penalty, default=1.0,
                   help="HF-style penalty, 1.0 = none")
    p.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    p.add_argument("--seed", type=argtypes.seed, default=None, help="seed for reproducible sampling")
    p.add_argument("--backend", choices=["auto", "eager", "compiled"], default="auto",
                   help="how decode steps run: eagerly, or compiled by torch.compile on a background thread "
                        "(default auto: compiled for chat; eager for one generate, which ends before a cold "
                        "compile would; docs/annotated/10_speed.md)")


def add_arguments(p):
    p.add_argument("prompt", nargs="?", help="the prompt (default: read from stdin)")
    add_sampling_arguments(p)
    p.add_argument("--template", choices=TEMPLATES, default="none",
                   help="wrap the prompt as one user turn of a chat template (default none: raw text)")
    p.add_argument("--system", help="system message (with a chat template)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, tokens, counts, speeds) instead of streaming")


def build_llama(args, one_shot: bool = True):
    """Llama.build from the common flags, with the argument errors users make named. one_shot: a
    single generation, for which "auto" means eager (a compile would finish after it)."""
    import torch

    if args.tp is not None and args.tp > 1:
        # ---- TENSOR-PARALLEL HOOK: relaunches under torchrun when needed; rank 0 gets a Llama over
        # its slice of the model, the other ranks follow its forward calls and exit with it. ----
        from ..parallel.tp_launch import build_llama as build_tensor_parallel_llama
        return build_tensor_parallel_llama(args)
    if args.tp is not None and args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    from ..inference.generation import Llama
    llama = Llama.build(args.model, args.tokenizer, max_seq_len=args.max_seq_len, dtype=args.dtype,
                        device=args.device, seed=1 if args.seed is None else args.seed, lora=args.lora,
                        backend="eager" if one_shot and args.backend == "auto" else args.backend)
    if args.quantize:
        from ..transforms.quantize import quantize_model
        quantize_model(llama.model, args.quantize)
    return llama


def sampling_kwargs(args):
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed,
                max_gen_len=args.max_new_tokens or None)


def run(args):
    prompt = args.prompt
    if prompt is None and sys.stdin.isatty():
        raise ValueError("no PROMPT: give it as an argument or pipe it on stdin")
    # with --tp this process relaunches itself under torchrun inside build_llama and exits
    # there, so stdin is left for rank 0 to read
    llama = build_llama(args)
    if prompt is None:
        from .argtypes import read_stdin
        prompt = read_stdin()  # invalid UTF-8: one line naming stdin
    ids = encode_prompt(llama.tokenizer, prompt, args.template, args.system)
    stops = list(args.stop) + list(TEMPLATE_STOPS[args.template])

    stream = llama.stream_tokens(ids, stop=stops, ignore_eos=args.ignore_eos, **sampling_kwargs(args))
    tokens, pieces = [], []
    t0 = time.perf_counter()
    t_first = None
    for token, piece in stream:
        if token is not None:
            tokens.append(token)
            if t_first is None:
                t_first = time.perf_counter()
        if piece:
            pieces.append(piece)
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    t_end = time.perf_counter()
    if t_first is None:
        t_first = t_end
    prefill_s, decode_s = t_first - t0, t_end - t_first
    if args.json:
        print(json.dumps({
            "text": "".join(pieces), "tokens": tokens, "prompt_tokens": len(ids), "generated_tokens": len(tokens),
            "prefill_tokens_per_s": round(len(ids) / prefill_s, 2) if prefill_s > 0 else None,
            "decode_tokens_per_s": round((len(tokens) - 1) / decode_s, 2) if len(tokens) > 1 and decode_s > 0
            else None,
        }, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0
