"""Figure: the paged key/value cache through a prefill, decode steps and a fork.

    python docs/figures/make_kv_cache.py [OUT_DIR]     writes OUT_DIR/kv_cache.png (default docs/figures/)

The cache is a pool of blocks of P token slots (P = 4 here; the package's default is 16), one pool per layer for
keys and one for values (annotated_llama/core/kv_cache.py, after vLLM's PagedAttention, Kwon et al. 2023). A sequence
owns a block table: position p lives in slot p % P of block table[p // P]. Block 0 is the scratch block that a
ragged batch's padding writes to.
The block numbers are the ones the package's KVCache gives (real_tables runs it), lowest free id first.
Top: the prefill of a 5-token prompt fills one block and starts a second; the causal (5, 5) scores.
Middle: each decode step writes one key into the next slot (a new block only every P tokens) and its query reads
every key of the sequence: a (1, S) row of scores.
Bottom: a fork (n samples of one prompt) shares the parent's blocks; in the next decode call the first writer of
the shared, half-full block gets a copy of it first (copy on write, inside the forward call), the other writes the
original alone, and the full block stays shared.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import Rectangle  # noqa: E402

from _draw import COLOURS, arrow, canvas, out_dir_from_argv, save  # noqa: E402

PROMPT = ["<s>", "In", "the", "begin", "ning"]
P = 4  # slots per block, small enough to draw
N_BLOCKS = 7
SLOT_W = 0.26
BLOCK_W = P * SLOT_W + 0.12
SHARED = "#b794f4"  # a block two sequences read
COPY = "#68d391"  # the child's copy of a shared block


def cells(ax, x, y, labels, colours, w=0.9, h=0.6, fontsize=8):
    for i, (lab, c) in enumerate(zip(labels, colours)):
        ax.add_patch(Rectangle((x + i * w, y), w, h, facecolor=c, edgecolor="#2d3748", lw=1))
        ax.text(x + i * w + w / 2, y + h / 2, lab, ha="center", va="center", fontsize=fontsize)


def pool(ax, x, y, contents, w=SLOT_W, h=0.42, title=""):
    """The block pool: contents[b] = (labels of its P slots, colour) or None for a free block."""
    for b in range(N_BLOCKS):
        bx = x + b * BLOCK_W
        labels, colour = contents.get(b, ([""] * P, "#ffffff" if b else COLOURS["masked"]))
        for s in range(P):
            filled = bool(labels[s])
            ax.add_patch(Rectangle((bx + s * w, y), w, h, facecolor=colour if filled or b == 0 else "#ffffff",
                                   edgecolor="#2d3748", lw=0.8))
            ax.text(bx + s * w + w / 2, y + h / 2, labels[s], ha="center", va="center", fontsize=6.5)
        ax.text(bx + P * w / 2, y - 0.12, (f"block {b}" if b else "0: scratch"), ha="center", va="top",
                fontsize=6.5, color="#4a5568")
    if title:
        ax.text(x, y + h + 0.12, title, fontsize=8.5)


def scores(ax, x, y, rows, cols, offset, cell=0.28, label=""):
    for r in range(rows):
        for c in range(cols):
            visible = c <= offset + r
            ax.add_patch(Rectangle((x + c * cell, y + (rows - 1 - r) * cell), cell, cell,
                                   facecolor=COLOURS["attn"] if visible else "#ffffff", edgecolor="#a0aec0", lw=0.6))
    if label:
        ax.text(x + cols * cell / 2, y - 0.15, label, ha="center", va="top", fontsize=7.5)


def keys(first, last):
    """Slot labels k_first..k_last-1 of one block (empty slots as "")."""
    return [f"k{p}" if p < last else "" for p in range(first, first + P)]


def real_tables():
    """The block tables the package's KVCache gives for the three panels (block size 4)."""
    from annotated_llama.core.kv_cache import KVCache

    c = KVCache(1, 1, 2, max_tokens=64, block_size=P)
    c.plan(["a"], [0], [5], 5)  # the prefill of 5 tokens
    prefill = list(c.tables["a"])
    c.plan(["a"], [5], [1], 1)
    c.plan(["a"], [6], [3], 3)  # (positions 6, 7, 8 at once: the figure skips to position 8)
    decode = list(c.tables["a"])
    f = KVCache(1, 1, 2, max_tokens=64, block_size=P)
    f.plan(["parent"], [0], [5], 5)
    f.fork("parent", "child")
    shared = (list(f.tables["parent"]), list(f.tables["child"]))
    f.plan(["parent", "child"], [5, 5], [1, 1], 1)  # one decode call: the first writer copies the shared block
    return prefill, decode, shared, (list(f.tables["parent"]), list(f.tables["child"]))


def main(out_dir: Path) -> Path:
    prefill, decode, shared, written = real_tables()
    fig, ax = canvas(14, 9.6)
    T = len(PROMPT)
    red, gen = COLOURS["cache"], COLOURS["gen"]

    def blocks_of(table, length, colour):
        return {b: (keys(i * P, length), colour) for i, b in enumerate(table)}

    # --- prefill
    ax.text(0.2, 9.2, "Prefill: one call for the whole prompt (positions 0..4)", fontsize=11, weight="bold")
    cells(ax, 0.4, 8.3, PROMPT, [COLOURS["prompt"]] * T, w=0.75, h=0.5)
    scores(ax, 0.9, 6.75, T, T, 0, label="scores (T, S) = (5, 5): causal")
    arrow(ax, (4.3, 8.55), (4.9, 8.55))
    pool(ax, 5.0, 8.3, blocks_of(prefill, T, red),
         title="one layer's key pool after the call (the values have a pool of the same shape)")
    ax.text(5.0, 7.5, f"block table of the sequence: {prefill}     position p -> slot p % {P} of block table[p // {P}]",
            fontsize=8.5)
    ax.text(5.0, 7.1, "blocks are taken as tokens arrive (lowest free id first) and given back when the sequence ends",
            fontsize=8, color="#4a5568")
    # --- decode
    ax.text(0.2, 6.1, "Decode: one call per new token, each reading its sequence's blocks", fontsize=11, weight="bold")
    for step, (tok, S, table) in enumerate((("God", T + 1, prefill), ("...", 9, decode))):
        y = 5.25 - step * 1.05
        cells(ax, 0.4, y, [tok], [gen], w=0.75, h=0.5)
        ax.text(1.25, y + 0.25, f"position {S - 1}", fontsize=8, va="center")
        arrow(ax, (2.45, y + 0.25), (2.95, y + 0.25))
        scores(ax, 3.0, y + 0.11, 1, S, S, cell=0.18)
        ax.text(3.0 + S * 0.18 + 0.1, y + 0.2, f"(1, {S})", fontsize=7.5, va="center")
        contents = blocks_of(table, S, red)
        block, slot = divmod(S - 1, P)
        labels = list(contents[table[block]][0])
        pool(ax, 5.0, y + 0.04, contents)
        bx = 5.0 + table[block] * BLOCK_W + slot * SLOT_W
        ax.add_patch(Rectangle((bx, y + 0.04), SLOT_W, 0.42, facecolor=gen, edgecolor="#2d3748", lw=0.8))
        ax.text(bx + SLOT_W / 2, y + 0.25, labels[slot], ha="center", va="center", fontsize=6.5)
    ax.text(5.0, 3.55, f"orange: the key written by this call; position 8 starts a new block (table {decode})",
            fontsize=8, color="#4a5568")
    # --- fork
    ax.text(0.2, 2.95, "Fork: n samples of one prompt share its blocks; a write into a shared block copies it first",
            fontsize=11, weight="bold")
    ax.text(0.4, 2.2, f"after the prefill:\nparent {shared[0]}, child {shared[1]}", fontsize=8.5, va="center")
    both = blocks_of(shared[0], T, SHARED)
    pool(ax, 5.0, 2.0, both)
    ax.text(0.4, 1.0, f"one decode call writes\nposition 5 of each:\nparent {written[0]}, child {written[1]}",
            fontsize=8.5, va="center")
    (p_first, p_last), (c_first, c_last) = written
    after = {p_first: (keys(0, 4), SHARED), c_last: (keys(4, 6), red), p_last: (keys(4, 6), COPY)}
    pool(ax, 5.0, 0.8, after)
    ax.text(5.0, 0.25, f"purple: read by both; green: block {p_last}, the parent's copy of block "
            f"{shared[0][-1]}, made inside the forward call before its k5 is written; the child then writes "
            f"block {c_last} alone", fontsize=7.5, color="#4a5568")
    return save(fig, out_dir, "kv_cache.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
