"""`annotated-llama COMMAND` / `python -m annotated_llama COMMAND`: a dispatch table, no logic.

Each command lives in `annotated_llama/cli/<module>.py` with `add_arguments(parser)` and
`run(args) -> int | None`. Only the chosen command's module is imported, so `--help` is fast
and one command's heavy dependencies never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys

COMMANDS = {  # name: (module under annotated_llama.cli, one-line help)
    "generate": ("generate", "generate text from a prompt (streams to stdout)"),
    "chat": ("chat", "interactive chat with a template; Ctrl-D ends"),
    "tokenize": ("tokenize", "print the token ids of a text"),
    "convert": ("convert", "convert weights between Meta, HF and GGUF layouts"),
    "info": ("info", "what a checkpoint is: format, architecture, tensors, tokenizer, memory (headers only)"),
    "download": ("download", "resumable, verified download from the Hugging Face Hub, Meta's URLs or a plain URL"),
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
    "export": ("export", "export a training checkpoint as a model dir with its measured perplexity"),
}

# Errors that mean "bad input": reported in one line, no traceback, exit status 2. Besides these,
# the project's own error types (DownloadError, CacheFull, ...); anything else (a TypeError, a
# KeyError) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its errors in one line (it prints the usage, then the error, by default)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = OneLineParser(prog="annotated-llama", description="The LLaMA model family in readable PyTorch.")
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
    args.argv = argv  # the command line as given (a command that relaunches itself passes it on)
    if module is None:
        parser.print_help()
        return 0 if not argv or argv in (["-h"], ["--help"]) else 2
    try:
        return module.run(args) or 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as e:
        if args.traceback or not _is_user_error(e):
            raise
        message = _one_line(e)
        rank, world = _torchrun_rank()
        if world > 1 and rank > 0 and (not _process_group_started() or _peer_gone(e)):
            # Under torchrun every rank runs the same checks: rank 0 says it once. A rank whose
            # peer died says nothing either (rank 0, or the rank that died, said why).
            return 2
        if world > 1 and rank > 0:
            message = f"rank {rank}: {message}"
        print(f"annotated-llama {args.command}: error: {message}", file=sys.stderr)
        return 2


def _is_user_error(e: BaseException) -> bool:
    ours = type(e).__module__.split(".")[0] == __package__
    return isinstance(e, USER_ERRORS + (pickle.UnpicklingError,)) or ours or _peer_gone(e)


def _one_line(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):  # torch's text advises weights_only=False: never
        return "refused to load a file holding pickled code or objects, not just tensors"
    if _peer_gone(e):
        return "another process of this run stopped (its error is above); stopping too"
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _torchrun_rank() -> tuple[int, int]:
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def _process_group_started() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _peer_gone(e: BaseException) -> bool:
    # gloo/NCCL, when the process at the other end of a collective has exited
    if _torchrun_rank()[1] <= 1 or not isinstance(e, RuntimeError):
        return False
    text = str(e)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                   "NCCL communicator was aborted", "Socket Timeout", "recvBytes", "sendBytes"))


if __name__ == "__main__":
    sys.exit(main())
