"""`annotated-llama COMMAND` / `python -m annotated_llama COMMAND`: a dispatch table, no logic.

Each command lives in `annotated_llama/cli/<module>.py` with `add_arguments(parser)` and
`run(args) -> int | None`. Only the chosen command's module is imported, so `--help` is fast
and one command's heavy dependencies never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {  # name: (module under annotated_llama.cli, one-line help)
    "generate": ("generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("chat", "interactive chat with a template; Ctrl-D ends"),
    "tokenize": ("tokenize", "print the token ids of a text"),
    "convert": ("convert", "convert weights between Meta, HF and GGUF layouts"),
    "info": ("info", "what a checkpoint is: format, architecture, tensors, tokenizer, memory (headers only)"),
    "download": ("download", "resumable, verified download of Meta-style or plain URLs"),
    "quantize": ("quantize", "weight-only int8/int4 quantization of a checkpoint"),
    "train-tokenizer": ("train_tokenizer", "train a SentencePiece BPE tokenizer with LLaMA's settings"),
    "pretokenize": ("pretokenize", "turn text files into token shards for training"),
    "pretrain": ("pretrain", "pretrain a LLaMA from scratch (one process or torchrun)"),
    "evaluate": ("evaluate", "validation loss and perplexity of a model on token shards or text"),
    "finetune": ("finetune", "Alpaca instruction fine-tuning, full or LoRA"),
    "eval-instruct": ("eval_instruct", "exact-match accuracy on a held-out instruction set"),
    "merge-lora": ("merge_lora", "merge a LoRA adapter into its base model"),
    "serve": ("serve", "OpenAI-compatible HTTP server with a chat page"),
    "self-instruct": ("self_instruct", "generate Alpaca-style instruction data through an OpenAI-compatible API"),
}

# Errors that mean "bad input": reported in one line, no traceback, exit status 2.
USER_ERRORS = (ValueError, OSError, KeyError, TypeError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="annotated-llama", description="The LLaMA model family in readable PyTorch.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (mod, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(f"annotated_llama.cli.{mod}")
            module.add_arguments(p)
    args = parser.parse_args(argv)
    if module is None:
        parser.print_help()
        return 0 if not argv or argv in (["-h"], ["--help"]) else 2
    try:
        return module.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if args.traceback:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, KeyError) and e.args:
            message = str(e.args[0])
        print(f"annotated-llama {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
