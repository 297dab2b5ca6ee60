"""Figure: the decode kernel's loop order (annotated_llama/inference/matvec.cpp), and the weight bytes a step reads.

    python docs/figures/make_decode_kernel.py [OUT_DIR]    writes OUT_DIR/decode_kernel.png (default docs/figures/)

Left: y = x @ w.T for M rows of x (one per sequence of a decode step). K is cut into chunks; the chunk of all M
activation rows stays in L1 while the thread's weight rows stream past it four at a time, each 16-weight vector
loaded once and used for M fused multiply-adds. Right: the weight bytes one step reads, for M separate
matrix-vector products against one pass of the kernel, on the 134M benchmark shape in bfloat16 (the weights read
per token computed from the preset, as the speed chapter's first block does).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _draw import out_dir_from_argv, save  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

N_BLOCKS, K_CHUNKS, M = 6, 4, 3  # drawn: 6 blocks of 4 weight rows, 4 chunks of K, 3 rows of x


def loop_order(ax):
    ax.set_xlim(0.5, 12.3)
    ax.set_ylim(0, 10.4)
    ax.set_aspect("equal")
    ax.axis("off")
    cw, rh = 1.5, 0.9  # one chunk of K wide; one block of 4 weight rows high
    x0, y0 = 3.2, 1.2  # the weight matrix's lower left corner
    chunk, block = 1, 2  # the tile being read
    # w (N, K): blocks of 4 rows by chunks of K
    for b in range(N_BLOCKS):
        for c in range(K_CHUNKS):
            y = y0 + (N_BLOCKS - 1 - b) * rh
            done = c < chunk or (c == chunk and b < block)
            colour = "#f6ad55" if (c, b) == (chunk, block) else ("#fde3c0" if done else "#ffffff")
            ax.add_patch(Rectangle((x0 + c * cw, y), cw, rh, facecolor=colour, edgecolor="#2d3748", lw=1))
    ax.text(x0 + K_CHUNKS * cw / 2, y0 + N_BLOCKS * rh + 0.25, "w (N, K): weight rows, 4 at a time (a thread's share)",
            ha="center", fontsize=9)
    ax.text(x0 - 0.15, y0 + (N_BLOCKS - 0.5 - block) * rh, "4 rows", ha="right", va="center", fontsize=8)
    # x (M, K) above, its current chunk highlighted
    xy0 = y0 + N_BLOCKS * rh + 1.0
    for m in range(M):
        for c in range(K_CHUNKS):
            colour = "#90cdf4" if c == chunk else "#edf2f7"
            ax.add_patch(Rectangle((x0 + c * cw, xy0 + (M - 1 - m) * 0.45), cw, 0.45, facecolor=colour,
                                   edgecolor="#2d3748", lw=1))
    ax.text(x0 - 0.15, xy0 + M * 0.45 / 2, f"x (M, K)\nM = {M} rows", ha="right", va="center", fontsize=8.5)
    ax.text(x0 + (chunk + 0.5) * cw, xy0 + M * 0.45 + 0.2, "a chunk of K for all M rows: stays in L1",
            ha="center", fontsize=8.5, color="#2b6cb0")
    # the tile meets the chunk
    tile = (x0 + (chunk + 0.5) * cw, y0 + (N_BLOCKS - 0.5 - block) * rh)
    ax.add_patch(FancyArrowPatch((x0 + (chunk + 0.5) * cw, xy0), (tile[0], tile[1] + rh / 2), arrowstyle="-|>",
                                 mutation_scale=10, color="#2b6cb0", lw=1.2))
    # y (M, N) to the right
    yx0 = x0 + K_CHUNKS * cw + 1.0
    for b in range(N_BLOCKS):
        for m in range(M):
            colour = "#9ae6b4" if b == block else "#f7fafc"
            ax.add_patch(Rectangle((yx0 + m * 0.45, y0 + (N_BLOCKS - 1 - b) * rh), 0.45, rh, facecolor=colour,
                                   edgecolor="#2d3748", lw=1))
    ax.text(yx0 + M * 0.45 / 2, y0 + N_BLOCKS * rh + 0.25, "y (M, N)", ha="center", fontsize=9)
    ax.add_patch(FancyArrowPatch((tile[0] + cw / 2, tile[1]), (yx0, tile[1]), arrowstyle="-|>", mutation_scale=10,
                                 color="#2f855a", lw=1.2))
    ax.text((tile[0] + cw / 2 + yx0) / 2, tile[1] + 0.2, "4 x M sums", ha="center", fontsize=8, color="#2f855a")
    ax.text(6, 0.5, "orange: the tile being read, once, widened to float32 in registers; pale: already read.\n"
                    "Outer loop: chunks of K; inner loop: the thread's blocks of weight rows.",
            ha="center", fontsize=8.5, color="#4a5568")
    ax.text(6, 10.0, "matvec.cpp's loop order: every weight read once per decode step", ha="center", fontsize=10.5,
            weight="bold")


def bytes_per_step(ax):
    from annotated_llama import ModelArgs

    args = ModelArgs.from_name("bench-134m")
    weights_mb = (args.num_params() - args.vocab_size * args.dim) * 2 / 1e6  # bfloat16, all but the embedding
    rows = [1, 2, 4, 8, 16]
    ax.plot(rows, [m * weights_mb for m in rows], "o-", color="#dd6b20",
            label="one matrix-vector product per row")
    ax.plot(rows, [weights_mb for _ in rows], "s-", color="#2b6cb0", label="the kernel: all rows in one pass")
    ax.set_xticks(rows, [str(r) for r in rows])
    ax.set(xlabel="rows in the decode step (sequences)", ylabel="weight bytes read per step (MB)",
           title=f"bench-134m in bfloat16: {weights_mb:.0f} MB of weights per pass")
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper left")


def main(out_dir: Path) -> Path:
    fig = plt.figure(figsize=(14, 5.2), dpi=100)
    left = fig.add_axes([0.0, 0.0, 0.6, 1.0])
    right = fig.add_axes([0.66, 0.14, 0.31, 0.72])
    loop_order(left)
    bytes_per_step(right)
    return save(fig, out_dir, "decode_kernel.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
