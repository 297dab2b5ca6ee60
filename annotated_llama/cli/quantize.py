"""`annotated-llama quantize SRC DST --mode int8|int4`: weight-only quantization of a checkpoint.

SRC is anything load_model reads (Meta, HF, GGUF, our dir); DST is a new dir in our layout
(params.json, model.safetensors with int8/int4 tensors, tokenizer.model), which
`annotated_llama.quantize.load_quantized` reads back.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(p):
    p.add_argument("src", help="checkpoint to quantize (dir or .gguf file)")
    p.add_argument("dst", help="output dir (must not exist or be empty)")
    p.add_argument("--mode", choices=("int8", "int4"), default="int8",
                   help="int8: per-channel (default); int4: group-wise")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args) -> int:
    from ..quantize import INT4_GROUP_SIZES, quantize_model, save_quantized
    from ..weights import load_model
    from .outputs import check_output

    dst = check_output(args.dst, force=args.force, inputs=[args.src], flag="DST")  # cli/outputs.py
    if args.mode == "int4" and args.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {args.group_size}: int4 needs one of {INT4_GROUP_SIZES}")
    model, tokenizer = load_model(args.src, dtype="float32")
    quantize_model(model, args.mode, group_size=args.group_size)
    save_quantized(model, dst, tokenizer_model=tokenizer.model_bytes() if tokenizer is not None else None)
    print(f"wrote {args.mode} checkpoint to {dst}")
    return 0
