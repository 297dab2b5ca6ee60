"""Figure: a decoder block of the original transformer beside LLaMA's block.

    python docs/figures/make_architecture.py [OUT_DIR]     writes OUT_DIR/architecture.png (default docs/figures/)

Left: the original transformer's decoder (Vaswani et al. 2017, figure 1) as decoder-only models use it (no
cross-attention): sinusoidal positions added to the embedding, post-norm (Add & LayerNorm after each sub-layer),
a ReLU feed-forward layer 4d wide. Right: LLaMA (Touvron et al. 2023, section 2.2): no position embedding, rotary
embeddings applied to queries and keys inside every attention layer, pre-norm with RMSNorm (the residual path is
never normalized), a SwiGLU feed-forward layer 2/3 * 4d wide, and a final RMSNorm before the output layer.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _draw import COLOURS, arrow, box, canvas, out_dir_from_argv, save  # noqa: E402


def column(ax, x, title, blocks, residual_pairs, repeat_span, repeat_label):
    ax.text(x, 13.4, title, ha="center", va="center", fontsize=11, weight="bold")
    for i, (y, text, colour, h) in enumerate(blocks):
        box(ax, x, y, 3.2, h, text, colour, fontsize=8.5)
        if i:
            prev_y, prev_h = blocks[i - 1][0], blocks[i - 1][3]
            arrow(ax, (x, prev_y + prev_h / 2), (x, y - h / 2))
    for lo, hi in residual_pairs:  # residual connections: branch off the main line, rejoin at the box's edge
        arrow(ax, (x, lo), (x - 2.1, lo), style="-")
        arrow(ax, (x - 2.1, lo), (x - 2.1, hi), style="-")
        arrow(ax, (x - 2.1, hi), (x - 1.6, hi))
    y0, y1 = repeat_span
    ax.add_patch(__import__("matplotlib.patches", fromlist=["Rectangle"]).Rectangle(
        (x - 2.4, y0), 4.8, y1 - y0, fill=False, ls="--", lw=1, edgecolor="#718096"))
    ax.text(x + 2.5, (y0 + y1) / 2, repeat_label, fontsize=9, va="center", color="#4a5568")


def main(out_dir: Path) -> Path:
    fig, ax = canvas(12, 14)
    # original decoder block: post-norm, learned/sinusoidal positions
    left = [
        (1.0, "token embedding\n+ sinusoidal position", COLOURS["embed"], 0.9),
        (2.6, "masked multi-head\nself-attention", COLOURS["attn"], 0.9),
        (4.0, "Add & LayerNorm", COLOURS["norm"], 0.6),
        (5.6, "feed-forward\nW2 ReLU(W1 x), 4d wide", COLOURS["ffn"], 0.9),
        (7.0, "Add & LayerNorm", COLOURS["norm"], 0.6),
        (8.4, "linear to vocabulary", COLOURS["out"], 0.6),
        (9.6, "softmax", COLOURS["add"], 0.6),
    ]
    column(ax, 2.9, "Transformer decoder\n(Vaswani et al. 2017; decoder-only)", left,
           residual_pairs=[(1.9, 4.0), (4.55, 7.0)], repeat_span=(1.7, 7.5), repeat_label="x N")
    # LLaMA block
    right = [
        (1.0, "token embedding\n(no position vector)", COLOURS["embed"], 0.9),
        (2.4, "RMSNorm", COLOURS["norm"], 0.6),
        (3.8, "masked self-attention\nRoPE on q, k; GQA (Llama 2/3)", COLOURS["attn"], 0.9),
        (5.1, "+", COLOURS["add"], 0.5),
        (6.3, "RMSNorm", COLOURS["norm"], 0.6),
        (7.7, "SwiGLU feed-forward\nW2(silu(W1 x) * W3 x), 2/3 4d", COLOURS["ffn"], 0.9),
        (9.0, "+", COLOURS["add"], 0.5),
        (10.3, "RMSNorm", COLOURS["norm"], 0.6),
        (11.5, "linear to vocabulary", COLOURS["out"], 0.6),
        (12.6, "softmax", COLOURS["add"], 0.6),
    ]
    column(ax, 8.9, "LLaMA block\n(Touvron et al. 2023, section 2.2)", right,
           residual_pairs=[(1.75, 5.1), (5.6, 9.0)], repeat_span=(1.65, 9.45), repeat_label="x L")
    ax.text(6, 0.2, "Left: normalization after each residual addition (post-norm). Right: normalization of each "
            "sub-layer's input (pre-norm);\nthe residual path (left edge) carries x unchanged from the embedding to "
            "the final RMSNorm.", ha="center", fontsize=8.5, color="#2d3748")
    return save(fig, out_dir, "architecture.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
