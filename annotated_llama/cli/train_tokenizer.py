"""`annotated-llama train-tokenizer CORPUS... --vocab-size N --out DIR`: SentencePiece BPE with LLaMA's settings."""

from pathlib import Path


def add_arguments(p):
    p.add_argument("corpus", nargs="+", help="UTF-8 text files (.txt, or .xz compressed)")
    p.add_argument("--vocab-size", type=int, default=4096, help="number of pieces (LLaMA: 32000)")
    p.add_argument("--out", required=True, help="directory for tokenizer.model")
    p.add_argument("--character-coverage", type=float, default=0.9999,
                   help="share of characters covered by pieces; the rest fall back to bytes")


def run(args):
    from ..tokenizer import Tokenizer
    from ..train.tokenizer_training import train_tokenizer

    if (Path(args.out) / "tokenizer.model").exists():
        raise FileExistsError(f"{Path(args.out) / 'tokenizer.model'}: already exists; choose another --out")
    path = train_tokenizer(args.corpus, args.vocab_size, args.out, character_coverage=args.character_coverage)
    print(f"wrote {path} ({Tokenizer(path).n_words} pieces)")
