"""`annotated-llama chat`: interactive turns on stdin/stdout; Ctrl-D (end of input) ends.

The history is re-encoded with the template every turn (Meta's chat_completion does the same).
When it no longer fits the context with room for the answer, the oldest (user, assistant)
pairs are dropped; the system message always stays.
"""

from __future__ import annotations

import sys

from ..core.chat_format import TEMPLATE_STOPS, encode_dialog
from .argtypes import read_stdin
from .generate import add_sampling_arguments, build_llama, sampling_kwargs


def add_arguments(p):
    add_sampling_arguments(p, max_new_tokens=512)
    p.add_argument("--template", choices=["llama-2", "llama-3", "alpaca", "model"],
                   help="chat template (default: llama-3 for a Llama 3 tokenizer, else llama-2)")
    p.add_argument("--system", help="system message kept at the start of the conversation")


def fit_history(tokenizer, dialog, template, max_prompt_tokens):
    """(prompt ids, dialog) with the oldest turns dropped until the prompt fits."""
    system = dialog[:1] if dialog[0]["role"] == "system" else []
    turns = dialog[len(system):]
    while True:
        ids = encode_dialog(tokenizer, system + turns, template)
        if len(ids) <= max_prompt_tokens or len(turns) <= 1:
            return ids, system + turns
        turns = turns[2:]  # the oldest user message and its answer


def run(args):
    llama = build_llama(args, one_shot=False)
    template = args.template or ("llama-3" if llama.tokenizer.kind == "tiktoken" else "llama-2")
    kwargs = sampling_kwargs(args)
    # room kept for the answer; the rest of the context holds the history
    reserve = min(args.max_new_tokens or llama.max_seq_len // 4, llama.max_seq_len // 2)
    dialog = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        try:
            line = read_stdin(line=True)
        except ValueError as e:  # one line of invalid UTF-8: say so and carry on, as for a template error
            print(f"annotated-llama chat: error: {e}", file=sys.stderr)
            continue
        if not line:  # EOF: Ctrl-D, or the end of piped input
            if interactive:
                sys.stdout.write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        try:
            ids, dialog = fit_history(llama.tokenizer, dialog + [{"role": "user", "content": line}], template,
                                      llama.max_seq_len - reserve)
        except ValueError as e:  # e.g. [INST] typed into a llama-2 chat: say so and carry on
            print(f"annotated-llama chat: error: {e}", file=sys.stderr)
            continue
        if len(ids) >= llama.max_seq_len:
            print(f"annotated-llama chat: error: this message alone is {len(ids)} tokens; the context is "
                  f"{llama.max_seq_len}", file=sys.stderr)
            dialog = dialog[:-1]
            continue
        answer, started = [], False
        for _, piece in llama.stream_tokens(ids, stop=list(args.stop) + list(TEMPLATE_STOPS[template]), **kwargs):
            if not started:  # the space after "[/INST]" / "### Response:" is not part of the answer
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        dialog.append({"role": "assistant", "content": "".join(answer).strip()})
