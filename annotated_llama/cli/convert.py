"""`annotated-llama convert SRC DST --to hf|meta|gguf|ours`: any checkpoint layout to any other.

SRC is anything `load_model` reads (a Meta, HF or our dir, or a .gguf file). DST is never
replaced without --force, and is written under a temporary name first, so a failed
conversion leaves whatever was there untouched.
"""

from pathlib import Path


def add_arguments(p):
    p.add_argument("src", help="checkpoint dir (Meta, HF or ours) or .gguf file")
    p.add_argument("dst", help="output dir (hf, meta, ours) or .gguf file")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf", "ours"], help="output layout")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="output dtype (default: as stored; q8_0 only for gguf)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (Meta: 13B=2, 70B=8)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def run(args):
    from ..weights import load_model, save_model
    from .outputs import check_output

    src, dst = Path(args.src), Path(args.dst)
    if args.dtype == "q8_0" and args.to != "gguf":
        raise ValueError("--dtype q8_0: only GGUF stores Q8_0 (use --to gguf)")
    if args.shards < 1 or (args.shards != 1 and args.to != "meta"):
        raise ValueError(f"--shards {args.shards}: a positive count, only for --to meta")
    check_output(dst, force=args.force, inputs=[src], flag="DST")  # cli/outputs.py: the rule of every writer
    # Load in the stored dtype; q8_0 quantizes from it at write time.
    load_dtype = None if args.dtype in (None, "q8_0") else args.dtype
    model, tokenizer = load_model(src, dtype=load_dtype)
    save_model(model, tokenizer, dst, format=args.to, dtype=args.dtype, shards=args.shards, overwrite=True)
    if not args.quiet:
        n = sum(p.numel() for p in model.parameters())
        print(f"{src} -> {dst} ({args.to}, {args.dtype or 'stored dtype'}, {n / 1e6:.1f}M parameters)")
