"""Figure: Meta's ragged-batch grid against the engine's one prefill and per-row decoding.

    python docs/figures/make_ragged_batch.py [OUT_DIR]     writes OUT_DIR/ragged_batch.png (default docs/figures/)

Four prompts of 4, 6, 9 and 6 tokens and 10 new tokens each (the example of docs/paper/11_meta_code.md).
Left: Meta's `generate` (llama/generation.py): prompts left-aligned in a (B, total_len) grid of pad_id; the
first call runs columns 0..3 (the shortest prompt), then one column per call; where a row still has prompt tokens
the sampled token is discarded ("teacher forcing"). Each column after the first is one forward call: 15 in all.
Right: the engine (annotated_llama/inference/engine.py). Top, the one prefill call: every prompt in a (4, 9) batch, right-
padded; the padding's keys go to the cache's scratch block, which no sequence reads. Bottom, each row in its own
positions: the number in a generated token is the forward call whose logits chose it (call 1 is the prefill, calls
2..10 decode one token for every row, each at its own position): 10 calls in all.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import Rectangle  # noqa: E402

from _draw import COLOURS, canvas, out_dir_from_argv, save  # noqa: E402

LENGTHS, NEW = [4, 6, 9, 6], 10
FED = "#2c5282"  # a prompt token fed one call at a time


def grid(ax, x0, y0, rows, cell=0.36):
    for r, row in enumerate(rows):
        for c, kind in enumerate(row):
            colour = {"p": COLOURS["prompt"], "g": COLOURS["gen"], "s": COLOURS["pad"], "f": FED, ".": COLOURS["pad"]}[kind]
            ax.add_patch(Rectangle((x0 + c * cell, y0 - r * cell), cell, cell, facecolor=colour,
                                   edgecolor="#a0aec0", lw=0.5, hatch="///" if kind == "s" else None))


def main(out_dir: Path) -> Path:
    fig, ax = canvas(16.4, 5.2)
    cell = 0.36
    total = max(LENGTHS) + NEW
    start = min(LENGTHS)
    # Meta: columns from `start` on are fed one per call; a prompt token there is teacher-forced (darker blue)
    meta_rows = [["p" if c < L and c < start else ("f" if c < L else ("g" if c < L + NEW else ".")) for c in range(total)]
                 for L in LENGTHS]
    ax.text(0.3, 4.75, "Meta's generate: one grid, one column per call", fontsize=11, weight="bold")
    grid(ax, 0.5, 3.6, meta_rows, cell)
    for c in range(start, total):
        ax.text(0.5 + c * cell + cell / 2, 3.6 + cell + 0.08, str(c - start + 1) if c > start else "1",
                ha="center", fontsize=6, color="#4a5568")
    ax.text(0.5, 4.25, "the forward call that fills each column:", fontsize=7, color="#4a5568")
    ax.add_patch(Rectangle((0.5, 3.6 - 3 * cell), start * cell, 4 * cell, fill=False, lw=2, edgecolor="#2b6cb0"))
    ax.text(0.5, 1.75, f"first call: columns 0..{start - 1} of every row; then {total - start - 1} calls of one column "
            f"= {total - start} forward calls", fontsize=8)
    ax.text(0.5, 1.35, "dark blue: prompt tokens fed one call at a time (the sample at that position is discarded)",
            fontsize=8)
    # the engine: one ragged prefill, then every row at its own positions
    x1 = 8.0
    ax.text(x1 - 0.2, 4.75, "The engine: one prefill, then every row at its own position", fontsize=11, weight="bold")
    L_max = max(LENGTHS)
    prefill_rows = [["p" if c < L else "s" for c in range(L_max)] for L in LENGTHS]
    ax.text(x1, 4.25, f"call 1, the prefill: a ({len(LENGTHS)}, {L_max}) batch; hatched padding writes the scratch block",
            fontsize=7, color="#4a5568")
    grid(ax, x1, 3.6, prefill_rows, cell)
    ax.add_patch(Rectangle((x1, 3.6 - 3 * cell), L_max * cell, 4 * cell, fill=False, lw=2, edgecolor="#2b6cb0"))
    y2 = 1.7
    ax.text(x1, y2 + cell + 0.12, "then each row's own positions (a number: the call whose logits chose the token)",
            fontsize=7, color="#4a5568")
    own = [["p" if c < L else ("g" if c < L + NEW else ".") for c in range(max(LENGTHS) + NEW)] for L in LENGTHS]
    grid(ax, x1, y2, own, cell)
    for r, L in enumerate(LENGTHS):
        for i in range(NEW):
            ax.text(x1 + (L + i) * cell + cell / 2, y2 - r * cell + cell / 2, str(i + 1), ha="center", va="center",
                    fontsize=5.5)
    ax.text(x1 + L_max * cell + 0.3, 3.6 - 1.5 * cell + cell / 2,
            f"1 prefill + {NEW - 1} decode calls\n= {NEW} forward calls;\na row that finishes\nleaves the batch at once",
            fontsize=8, va="center")
    # legend
    for i, (kind, text) in enumerate([("p", "prompt token"), ("f", "prompt token fed alone"),
                                      ("g", "generated token"), (".", "padding")]):
        x = (0.5, 2.3, 4.9, 6.7)[i]
        ax.add_patch(Rectangle((x, 0.45), cell, cell, facecolor={"p": COLOURS["prompt"], "f": FED,
                                                                   "g": COLOURS["gen"], ".": COLOURS["pad"]}[kind],
                               edgecolor="#a0aec0"))
        ax.text(x + 0.5, 0.45 + cell / 2, text, fontsize=8, va="center")
    ax.text(0.5, 0.0, f"prompts of {', '.join(map(str, LENGTHS))} tokens, {NEW} new tokens each", fontsize=8,
            color="#4a5568")
    return save(fig, out_dir, "ragged_batch.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
