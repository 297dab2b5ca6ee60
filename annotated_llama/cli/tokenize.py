"""`annotated-llama tokenize TEXT`: print the ids, separated by spaces."""

from ..core.tokenizer import Tokenizer
from . import argtypes


def add_arguments(p):
    p.add_argument("text", type=argtypes.utf8_text, help="text to tokenize")
    p.add_argument("--tokenizer", help="tokenizer.model or .gguf (default: the embedded default model's)")
    p.add_argument("--bos", action="store_true", help="prepend the BOS id")
    p.add_argument("--eos", action="store_true", help="append the EOS id")
    p.add_argument("--pieces", action="store_true", help="print the pieces next to the ids")


def run(args):
    path = args.tokenizer
    if path is None:
        from ..default_model import default_model_dir
        path = default_model_dir() / "tokenizer.model"
    tok = Tokenizer(path)
    ids = tok.encode(args.text, bos=args.bos, eos=args.eos)
    if args.pieces:
        print(" ".join(f"{i}:{tok.id_to_piece(i)}" for i in ids))
    else:
        print(" ".join(map(str, ids)))
