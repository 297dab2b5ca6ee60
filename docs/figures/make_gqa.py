"""Figure: multi-head, grouped-query and multi-query attention (Ainslie et al. 2023, figure 2).

    python docs/figures/make_gqa.py [OUT_DIR]     writes OUT_DIR/gqa.png (default docs/figures/)

Eight query heads in each panel. Multi-head attention (K = H = 8): each query head has its own key/value head.
Grouped-query attention (K = 2 here; Llama 2 70B and Llama 3 use K = 8 for H = 64 or 32): query head h reads
key/value head h // (H/K). Multi-query attention (K = 1, Shazeer 2019): one key/value head for all. Below each
panel, the KV cache per token relative to multi-head attention.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _draw import COLOURS, arrow, box, canvas, out_dir_from_argv, save  # noqa: E402

H = 8


def panel(ax, x0, title, K):
    ax.text(x0 + 2.3, 5.3, title, ha="center", fontsize=10.5, weight="bold")
    group = H // K
    palette = ["#fbd38d", "#9ae6b4", "#90cdf4", "#d6bcfa", "#feb2b2", "#fefcbf", "#c6f6d5", "#bee3f8"]
    for k in range(K):
        width = 4.6 / K
        cx = x0 + width * (k + 0.5)
        box(ax, cx, 1.5, min(width - 0.15, 1.0), 0.7, f"k{k}\nv{k}", COLOURS["cache"], fontsize=8)
    for h in range(H):
        cx = x0 + 4.6 / H * (h + 0.5)
        k = h // group
        box(ax, cx, 4.1, 0.45, 0.7, f"q{h}", palette[k % len(palette)], fontsize=8)
        kx = x0 + 4.6 / K * (k + 0.5)
        arrow(ax, (kx, 1.85), (cx, 3.75), colour="#4a5568", lw=0.9)
    ax.text(x0 + 2.3, 0.75, f"K = {K} key/value head{'s' if K > 1 else ''}", ha="center", fontsize=9)
    ax.text(x0 + 2.3, 0.35, f"KV cache per token: {K}/{H} = {K / H:.3g} of multi-head", ha="center", fontsize=8.5,
            color="#4a5568")


def main(out_dir: Path) -> Path:
    fig, ax = canvas(15.6, 5.8)
    panel(ax, 0.3, "multi-head (LLaMA 1)", 8)
    panel(ax, 5.5, "grouped-query (Llama 2 34B/70B, Llama 3)", 2)
    panel(ax, 10.7, "multi-query", 1)
    ax.text(7.8, 5.65, f"{H} query heads; query head h reads key/value head h // (H/K)", ha="center", fontsize=9,
            color="#4a5568")
    return save(fig, out_dir, "gqa.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
