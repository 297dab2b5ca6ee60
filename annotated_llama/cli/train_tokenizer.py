"""`annotated-llama train-tokenizer CORPUS... --vocab-size N --out DIR`: SentencePiece BPE with LLaMA's settings."""

from pathlib import Path

from . import argtypes


def add_arguments(p):
    p.add_argument("corpus", nargs="+", help="UTF-8 text files (.txt, or .xz compressed)")
    p.add_argument("--vocab-size", type=argtypes.positive_int, default=4096, help="number of pieces (LLaMA: 32000)")
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--character-coverage", type=argtypes.float_range(0.0, 1.0, lo_open=True), default=0.9999,
                   help="share of characters covered by pieces; the rest fall back to bytes")
    p.add_argument("--force", action="store_true", help="replace an existing OUT/tokenizer.model")


def run(args):
    from ..core.outputs import check_output
    from ..core.tokenizer import Tokenizer
    from ..train.tokenizer_training import train_tokenizer

    check_output(Path(args.out) / "tokenizer.model", force=args.force, inputs=args.corpus)
    path = train_tokenizer(args.corpus, args.vocab_size, args.out, character_coverage=args.character_coverage)
    print(f"wrote {path} ({Tokenizer(path).n_words} pieces)")
