"""Figure: where the default model's attention heads look.

    python docs/figures/make_attention.py [OUT_DIR] [--model DIR | --random-tiny]
        writes OUT_DIR/attention.png (default docs/figures/)

The embedded default model (annotated_llama/default_model) reads a verse; the figure shows the attention
probabilities softmax(q k^T / sqrt(D)) of the four sharpest heads (lowest entropy) of its first and last layers,
on a square-root colour scale (the colour bar
maps colour to probability), recomputed from what each
attention module receives (the normalized input and the rotary tables), exactly as the model computes them.
--random-tiny draws the same picture for the random-weight "tiny" preset (only for developing this script:
random weights have no meaningful pattern). A missing default model is an error, never a silent fallback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
import torch  # noqa: E402

from annotated_llama import ModelArgs, Tokenizer, Transformer  # noqa: E402
from annotated_llama.core.model import apply_rope  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "In the beginning, God created the heavens and the earth. The earth was formless and empty."
HEADS_SHOWN = 4


def load_model_dir(d: Path | None) -> tuple[Transformer, Tokenizer]:
    """Our checkpoint layout (params.json, model.safetensors, tokenizer.model); None: the default model."""
    from safetensors.torch import load_file

    if d is None:
        from annotated_llama.default_model import default_model_dir
        d = default_model_dir()  # raises FileNotFoundError naming the directory
    model = Transformer(ModelArgs.from_params_json(d / "params.json"))
    model.load_state_dict(load_file(d / "model.safetensors"))
    return model.eval(), Tokenizer(d / "tokenizer.model")


def attention_probabilities(model: Transformer, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the (H, T, T) attention probabilities of row 0 of `tokens` (B=1, T)."""
    captured = []

    def grab(module, args):  # Attention.forward(x, cos, sin, mask, cache)
        captured.append((module, args[0], args[1], args[2]))

    hooks = [layer.attention.register_forward_pre_hook(grab) for layer in model.layers]
    try:
        with torch.no_grad():
            model(tokens, cache=False)
            probs = []
            for attn, x, cos, sin in captured:
                B, T, _ = x.shape
                q = apply_rope(attn.wq(x).view(B, T, attn.n_heads, attn.head_dim), cos, sin)  # (B, T, H, D)
                k = apply_rope(attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim), cos, sin)  # (B, T, K, D)
                k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=2)  # (B, T, H, D): GQA sharing
                scores = torch.einsum("bthd,bshd->bhts", q, k) / attn.head_dim ** 0.5  # (B, H, T, S)
                causal = torch.ones(T, T, dtype=torch.bool).tril()
                probs.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0])  # (H, T, S)
    finally:
        for h in hooks:
            h.remove()
    return probs


def main(out_dir: Path, random_tiny: bool = False, model_dir: Path | None = None) -> Path:
    if random_tiny:
        torch.manual_seed(0)
        model = Transformer(ModelArgs.from_name("tiny")).eval()
        tokens = torch.randint(3, model.vocab_size, (1, 20))
        labels = [str(int(t)) for t in tokens[0]]
        title = "random-weight tiny model (development only)"
    else:
        model, tok = load_model_dir(model_dir)
        tokens = torch.tensor([tok.encode(PROMPT, bos=True, eos=False)])
        labels = [tok.id_to_piece(int(t)).replace("\u2581", "_") for t in tokens[0]]
        name = "the default model" if model_dir is None else str(model_dir)
        title = f"{name} ({model.params.n_layers} layers, {model.params.n_heads} heads)"
    probs = attention_probabilities(model, tokens)
    layers = [0, len(probs) - 1]
    n_heads = min(HEADS_SHOWN, probs[0].shape[0])
    # per layer, the sharpest heads (lowest mean entropy of their attention rows): the ones with a pattern
    entropy = [-(p * p.clamp_min(1e-12).log()).sum(-1).mean(-1) for p in probs]  # per layer: (H,)
    shown = {layer: sorted(entropy[layer].argsort()[:n_heads].tolist()) for layer in layers}
    fig, axes = plt.subplots(len(layers), n_heads, figsize=(3.3 * n_heads + 1.2, 3.5 * len(layers)), dpi=100,
                             squeeze=False)
    T = tokens.shape[1]
    norm = PowerNorm(0.5, vmin=0, vmax=1)  # square-root scale: weights of a few percent stay visible
    for row, layer in enumerate(layers):
        for col, h in enumerate(shown[layer]):
            ax = axes[row][col]
            image = ax.imshow(probs[layer][h].numpy(), cmap="Blues", norm=norm)
            ax.set_title(f"layer {layer}, head {h}", fontsize=9)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels if col == 0 else [], fontsize=6)
    fig.tight_layout(rect=(0.01, 0.01, 0.92, 0.95))
    bar = fig.colorbar(image, ax=[a for r in axes for a in r], fraction=0.025, pad=0.02,
                       ticks=[0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0])
    bar.set_label("attention probability (square-root colour scale)", fontsize=9)
    bar.ax.tick_params(labelsize=7)
    fig.supxlabel("key (attended-to token)", fontsize=9)
    fig.supylabel("query (token being predicted from)", fontsize=9)
    fig.suptitle(f"Attention probabilities of {title}: the four sharpest heads of the first and last layer",
                 fontsize=11)
    out = Path(out_dir) / "attention.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="draw attention patterns of the default model")
    ap.add_argument("out_dir", nargs="?", type=Path, default=HERE)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint dir instead of the default model")
    ap.add_argument("--random-tiny", action="store_true", help="a random tiny model instead (development only)")
    args = ap.parse_args()
    try:
        print(main(args.out_dir, args.random_tiny, args.model))
    except (OSError, ValueError) as e:
        print(f"make_attention.py: error: {e}", file=sys.stderr)
        sys.exit(2)
