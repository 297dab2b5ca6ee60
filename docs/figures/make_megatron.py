"""Figure: Megatron-LM's column-parallel and row-parallel split of a sub-layer (Shoeybi et al. 2019, figure 3).

    python docs/figures/make_megatron.py [OUT_DIR]     writes OUT_DIR/megatron.png (default docs/figures/)

The feed-forward sub-layer Z = W2 f(W1 X) on two GPUs. W1 (and W3 in SwiGLU) is split by its output rows
(column-parallel in Megatron's notation, where weights multiply from the right): GPU i computes its slice of the
hidden units f(W1_i X) with no communication, since f acts element by element. W2 is split by its input columns
(row-parallel): GPU i computes the partial sum W2_i Y_i, and one all-reduce adds them. Attention is split the same
way by heads (wq, wk, wv column-parallel, wo row-parallel). The package's tensor_parallel.py implements this split.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import Rectangle  # noqa: E402

from _draw import COLOURS, arrow, box, canvas, out_dir_from_argv, save  # noqa: E402

GPU = ["#90cdf4", "#fbd38d"]


def matrix(ax, x, y, w, h, split, label, colours=GPU):
    """A weight matrix of (h rows, w columns) drawn split in two, by rows (split='rows') or columns."""
    for i in range(2):
        if split == "rows":
            ax.add_patch(Rectangle((x, y + (1 - i) * h / 2), w, h / 2, facecolor=colours[i], edgecolor="#2d3748"))
        else:
            ax.add_patch(Rectangle((x + i * w / 2, y), w / 2, h, facecolor=colours[i], edgecolor="#2d3748"))
    ax.text(x + w / 2, y + h + 0.2, label, ha="center", fontsize=9)


def main(out_dir: Path) -> Path:
    fig, ax = canvas(14, 6.4)
    box(ax, 1.0, 3.2, 1.2, 1.0, "X\n(T, C)\non both GPUs", COLOURS["embed"], fontsize=8)
    matrix(ax, 2.4, 1.7, 1.2, 3.0, "rows", "W1 (F, C):\nsplit by output rows\n(column-parallel)")
    for i, y in enumerate((3.95, 2.45)):
        arrow(ax, (1.6, 3.2), (2.35, y))
        arrow(ax, (3.65, y), (4.6, y))
        box(ax, 5.5, y, 1.7, 0.8, f"Y{i + 1} = f(W1_{i + 1} X)\n(T, F/2) on GPU {i + 1}", GPU[i], fontsize=8)
    matrix(ax, 7.2, 2.1, 2.2, 2.2, "cols", "W2 (C, F):\nsplit by input columns\n(row-parallel)")
    for i, y in enumerate((3.95, 2.45)):
        arrow(ax, (6.35, y), (7.15 + i * 1.1 + 0.5, 3.2 + (0.5 if i == 0 else -0.5)), rad=0.0)
        box(ax, 10.5, y, 1.6, 0.8, f"Z{i + 1} = W2_{i + 1} Y{i + 1}\npartial sum, (T, C)", GPU[i], fontsize=8)
        arrow(ax, (9.45, 3.2 + (0.5 if i == 0 else -0.5)), (9.7, y))
        arrow(ax, (11.3, y), (12.1, 3.2))
    box(ax, 12.8, 3.2, 1.3, 1.0, "all-reduce\nZ = Z1 + Z2\non both GPUs", COLOURS["out"], fontsize=8)
    ax.text(7.0, 0.9, "no communication until the all-reduce: f (ReLU, or SwiGLU's silu(W1 x) * W3 x) acts element "
            "by element on each GPU's own hidden units", ha="center", fontsize=8.5)
    ax.text(7.0, 0.45, "attention: wq, wk, wv split by whole heads (column-parallel), wo by its input columns "
            "(row-parallel): two all-reduces per layer", ha="center", fontsize=8.5, color="#4a5568")
    ax.text(7.0, 6.05, "One sub-layer on two GPUs (Megatron-LM, Shoeybi et al. 2019)", ha="center", fontsize=11,
            weight="bold")
    return save(fig, out_dir, "megatron.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
