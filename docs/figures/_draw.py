"""Small drawing helpers shared by the diagram scripts (matplotlib only, Agg backend)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

HERE = Path(__file__).resolve().parent
COLOURS = {
    "attn": "#fbd38d", "ffn": "#9ae6b4", "norm": "#fefcbf", "embed": "#e2e8f0", "rope": "#d6bcfa",
    "add": "#ffffff", "out": "#bee3f8", "cache": "#feb2b2", "pad": "#edf2f7", "prompt": "#90cdf4",
    "gen": "#f6ad55", "masked": "#cbd5e0",
}


def box(ax, x, y, w, h, text, colour="#ffffff", fontsize=9, edge="#2d3748", round_=0.02, **kw):
    """A rounded box centred at (x, y)."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle=f"round,pad=0,rounding_size={round_}",
                                facecolor=colour, edgecolor=edge, lw=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize, **kw)


def arrow(ax, start, end, colour="#2d3748", lw=1.2, style="-|>", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=colour, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}"))


def canvas(width, height, dpi=100):
    fig, ax = plt.subplots(figsize=(width, height), dpi=dpi)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def save(fig, out_dir, name):
    out = Path(out_dir) / name
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


def out_dir_from_argv():
    return Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
