"""`annotated-llama quantize SRC DST --mode int8|int4|q8_0|q5_1|q5_0|q4_1|q4_0`: weight-only quantization.

SRC is anything load_model reads (Meta, HF, GGUF, our dir). int8/int4 write DST as a dir in our
layout (params.json, model.safetensors with int8/int4 tensors, tokenizer.model), which
`annotated_llama.transforms.quantize.load_quantized` (and load_model) reads back; the q* modes write DST as
a GGUF file of that llama.cpp type, which llama.cpp runs as is. DST is refused if it exists
(unless --force) or is the input, and is written under a temporary name, then renamed.
"""

from __future__ import annotations

from pathlib import Path

from .convert import GGUF_DTYPES, float_load_dtype


def add_arguments(p):
    p.add_argument("src", help="checkpoint to quantize (dir or .gguf file)")
    p.add_argument("dst", help="output: a dir (int8, int4) or a .gguf file (q8_0 ... q4_0)")
    p.add_argument("--mode", choices=("int8", "int4", *GGUF_DTYPES), default="int8",
                   help="int8: per-channel (default); int4: group-wise; q8_0, q5_1, q5_0, q4_1, q4_0: a GGUF file")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32, 64, 128 or 256 (default 128)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")


def run(args) -> int:
    from ..core.outputs import check_output, replacing
    from ..transforms.quantize import INT4_GROUP_SIZES, quantize_model, save_quantized
    from ..weights import load_model, save_model

    src = Path(args.src)
    dst = check_output(args.dst, force=args.force, inputs=[src], flag="DST")  # cli/outputs.py
    if args.mode == "int4" and args.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size {args.group_size}: int4 needs one of {INT4_GROUP_SIZES}")
    if args.mode in GGUF_DTYPES:
        if dst.is_dir():
            raise IsADirectoryError(f"{dst}: is a directory; --mode {args.mode} writes a GGUF file")
        model, tokenizer = load_model(src, dtype=float_load_dtype(src, None))
        save_model(model, tokenizer, dst, format="gguf", dtype=args.mode)  # a temporary name, then renamed
        print(f"wrote {args.mode.upper()} GGUF {dst}")
        return 0
    if dst.is_file():
        raise NotADirectoryError(f"{dst}: is a file; --mode {args.mode} writes a checkpoint directory")
    model, tokenizer = load_model(src, dtype="float32")
    quantize_model(model, args.mode, group_size=args.group_size)
    with replacing(dst, directory=True) as tmp:  # the old dir goes only once the new one is complete
        save_quantized(model, tmp, tokenizer_model=tokenizer.model_bytes() if tokenizer is not None else None)
    print(f"wrote {args.mode} checkpoint to {dst}")
    return 0
