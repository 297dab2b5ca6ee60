"""`annotated-llama merge-lora BASE ADAPTER OUT`: fold a LoRA adapter into its base weights.

W' = W + (alpha / r) B A for every adapted projection (Hu et al. 2021, section 4.1: no inference
latency once merged). OUT is a plain checkpoint in our dir format (or --format hf/meta).
"""


def add_arguments(p):
    p.add_argument("base", help="base model: any checkpoint load_model reads")
    p.add_argument("adapter", help="PEFT-format LoRA adapter dir (ours or PEFT's)")
    p.add_argument("out", help="output checkpoint dir (refused if it exists, unless --force)")
    p.add_argument("--format", default="ours", choices=["ours", "hf", "meta"])
    p.add_argument("--dtype", help="f32, f16 or bf16 (default: the base model's)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def run(args):
    from ..core.outputs import check_output
    from ..train.finetune import own_weights
    from ..transforms.lora import merge_and_unload
    from ..weights import load_model, save_model

    out = check_output(args.out, force=args.force, inputs=[args.base, args.adapter], flag="OUT")
    model, tokenizer = load_model(args.base)
    model = own_weights(model)  # merging writes into the weights: never into a mapped file
    from ..transforms.lora import load_adapter
    load_adapter(model, args.adapter)
    merge_and_unload(model)
    save_model(model, tokenizer, out, format=args.format, dtype=args.dtype, overwrite=True)
    print(f"merged {args.adapter} into {args.base} -> {out}")
