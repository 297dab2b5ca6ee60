"""`annotated-llama convert SRC DST --to hf|meta|gguf|ours`: any checkpoint layout to any other.

SRC is anything `load_model` reads (a Meta, HF or our dir, or a .gguf file of any type). DST is
never replaced without --force, never the input, and is written under a temporary name first,
so a failed conversion leaves whatever was there untouched. GGUF output may be quantized
(--dtype q8_0, q5_1, q5_0, q4_1, q4_0), which llama.cpp runs as is.
"""

from pathlib import Path

FLOAT_DTYPES = ["f32", "f16", "bf16"]
GGUF_DTYPES = ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]


def add_arguments(p):
    p.add_argument("src", help="checkpoint dir (Meta, HF or ours) or .gguf file")
    p.add_argument("dst", help="output dir (hf, meta, ours) or .gguf file")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf", "ours"], help="output layout")
    p.add_argument("--dtype", choices=FLOAT_DTYPES + GGUF_DTYPES,
                   help="output dtype (default: as stored, float32 from a quantized GGUF; q* only for gguf)")
    p.add_argument("--shards", type=int, default=1, help="model-parallel shards for --to meta (Meta: 13B=2, 70B=8)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")


def float_load_dtype(src: Path, dtype):
    """The dtype to load SRC in for a float (or our GGUF-quantized) output: as stored, but a
    quantized GGUF in float32 (its dequantized values), never into the int8/int4 kernels."""
    if dtype in FLOAT_DTYPES:
        return dtype
    from ..weights import detect_format
    if detect_format(src) == "gguf":
        from ..weights.gguf import is_quantized
        return "float32" if is_quantized(src) else None
    return None


def run(args):
    from ..core.outputs import check_output
    from ..weights import load_model, save_model

    src, dst = Path(args.src), Path(args.dst)
    if args.dtype in GGUF_DTYPES and args.to != "gguf":
        raise ValueError(f"--dtype {args.dtype}: only GGUF stores {args.dtype.upper()} (use --to gguf)")
    if args.shards < 1 or (args.shards != 1 and args.to != "meta"):
        raise ValueError(f"--shards {args.shards}: a positive count, only for --to meta")
    check_output(dst, force=args.force, inputs=[src], flag="DST")  # cli/outputs.py: the rule of every writer
    model, tokenizer = load_model(src, dtype=float_load_dtype(src, args.dtype))
    save_model(model, tokenizer, dst, format=args.to, dtype=args.dtype, shards=args.shards, overwrite=True)
    if not args.quiet:
        n = sum(p.numel() for p in model.parameters())
        print(f"{src} -> {dst} ({args.to}, {args.dtype or 'stored dtype'}, {n / 1e6:.1f}M parameters)")
