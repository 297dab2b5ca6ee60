"""Figure: prefill and decode with the key/value cache.

    python docs/figures/make_kv_cache.py [OUT_DIR]     writes OUT_DIR/kv_cache.png (default docs/figures/)

Top: the prefill call, forward(prompt, start_pos=0): all T prompt tokens run at once, every layer writes their keys
and values into cache slots 0..T-1, and the causal (T, T) score matrix is computed. Bottom: a decode step,
forward([token], start_pos=T+i): one new token's query, key and value; the key and value are appended at slot T+i and
the query attends to every cached slot: a (1, S) row of scores. The calling protocol is Meta's (llama/model.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import Rectangle  # noqa: E402

from _draw import COLOURS, arrow, canvas, out_dir_from_argv, save  # noqa: E402

PROMPT = ["<s>", "In", "the", "begin", "ning"]
NEW = ["God", "created"]


def cells(ax, x, y, labels, colours, w=0.9, h=0.6, fontsize=8):
    for i, (lab, c) in enumerate(zip(labels, colours)):
        ax.add_patch(Rectangle((x + i * w, y), w, h, facecolor=c, edgecolor="#2d3748", lw=1))
        ax.text(x + i * w + w / 2, y + h / 2, lab, ha="center", va="center", fontsize=fontsize)


def scores(ax, x, y, rows, cols, offset, cell=0.32, label=""):
    for r in range(rows):
        for c in range(cols):
            visible = c <= offset + r
            ax.add_patch(Rectangle((x + c * cell, y + (rows - 1 - r) * cell), cell, cell,
                                   facecolor=COLOURS["attn"] if visible else "#ffffff", edgecolor="#a0aec0", lw=0.6))
    ax.text(x + cols * cell / 2, y - 0.3, label, ha="center", va="top", fontsize=8)


def main(out_dir: Path) -> Path:
    fig, ax = canvas(13, 8.2)
    T = len(PROMPT)
    # --- prefill
    ax.text(0.2, 7.7, "Prefill: forward(prompt, start_pos=0), one call for the whole prompt", fontsize=11, weight="bold")
    cells(ax, 0.4, 6.6, PROMPT, [COLOURS["prompt"]] * T)
    ax.text(0.4, 6.35, "T = 5 new tokens: queries, keys and values for all of them", fontsize=8, va="top")
    arrow(ax, (5.2, 6.9), (6.4, 6.9))
    ax.text(6.5, 7.35, "KV cache of one layer after the call (slots 0..4 written)", fontsize=8.5)
    cells(ax, 6.5, 6.6, [f"k{i}" for i in range(T)] + [""] * 4, [COLOURS["cache"]] * T + [COLOURS["pad"]] * 4, w=0.65)
    cells(ax, 6.5, 5.95, [f"v{i}" for i in range(T)] + [""] * 4, [COLOURS["cache"]] * T + [COLOURS["pad"]] * 4, w=0.65)
    scores(ax, 1.2, 3.9, T, T, 0, label="scores (T, S) = (5, 5): the causal triangle")
    ax.text(3.6, 4.6, "every position predicts its next token;\nthe last row's logits give the first new token",
            fontsize=8, va="center")
    # --- decode
    ax.text(0.2, 3.0, "Decode: forward([token], start_pos=S), one call per new token", fontsize=11, weight="bold")
    for step, tok in enumerate(NEW):
        y = 1.9 - step * 1.25
        S = T + step
        cells(ax, 0.4, y, [tok], [COLOURS["gen"]])
        ax.text(1.45, y + 0.3, f"start_pos = {S}", fontsize=8, va="center")
        arrow(ax, (2.7, y + 0.3), (3.3, y + 0.3))
        labels = [f"k{i}" for i in range(S + 1)]
        cells(ax, 3.4, y, labels, [COLOURS["cache"]] * S + [COLOURS["gen"]], w=0.6, fontsize=7)
        scores(ax, 8.3, y + 0.15, 1, S + 1, S, label="")
        ax.text(8.3 + (S + 1) * 0.32 + 0.2, y + 0.3, f"scores (1, {S + 1})", fontsize=8, va="center")
    ax.text(8.3, 2.55, "one query against every cached key", fontsize=8)
    ax.text(3.4, -0.05, "orange: the key/value appended by this call; red: read from the cache, never recomputed",
            fontsize=8, color="#4a5568")
    return save(fig, out_dir, "kv_cache.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
