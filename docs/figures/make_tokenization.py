"""Figure: one sentence cut into tokens by two vocabularies, each token a coloured box.

    python docs/figures/make_tokenization.py [OUT_DIR]   writes OUT_DIR/tokenization.png (default docs/figures/)

Top: LLaMA 1/2's 32,000-piece SentencePiece BPE (tests/assets/llama-spm.model). Bottom: the default model's
4,096-piece BPE, trained with LLaMA's settings on the World English Bible only
(annotated_llama/default_model/tokenizer.model). Boxes show each piece as SentencePiece stores it (the leading
space as an underscore-like mark, digits alone, unknown characters as UTF-8 byte pieces); colours cycle by
position, the number under each box is its id.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import FancyBboxPatch  # noqa: E402

from _draw import canvas, out_dir_from_argv, save  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TEXT = "In the beginning, God created the heavens and the earth in 2023. Tokenizers split naïvely 🦙"
PALETTE = ["#fed7d7", "#feebc8", "#fefcbf", "#c6f6d5", "#bee3f8", "#e9d8fd", "#fed7e2"]


def row(ax, y, tok, label):
    ids = tok.encode(TEXT, bos=False, eos=False)
    ax.text(0.3, y + 0.95, f"{label}: {len(ids)} tokens", fontsize=10, weight="bold")
    x = 0.3
    for k, i in enumerate(ids):
        piece = tok.id_to_piece(i).replace("\u2581", "\u2423")  # show the word-start mark as an open box
        w = 0.16 * max(len(piece), 2) + 0.18
        if x + w > 15.7:
            x, y = 0.3, y - 0.95
        ax.add_patch(FancyBboxPatch((x, y), w, 0.5, boxstyle="round,pad=0,rounding_size=0.06",
                                    facecolor=PALETTE[k % len(PALETTE)], edgecolor="#4a5568", lw=0.8))
        ax.text(x + w / 2, y + 0.25, piece, ha="center", va="center", fontsize=8, family="DejaVu Sans Mono")
        ax.text(x + w / 2, y - 0.15, str(i), ha="center", va="center", fontsize=5.5, color="#4a5568")
        x += w + 0.06
    return y


def main(out_dir: Path) -> Path:
    from annotated_llama import Tokenizer
    from annotated_llama.default_model import default_model_dir

    fig, ax = canvas(16, 7.0)
    y = row(ax, 5.9, Tokenizer(REPO / "tests" / "assets" / "llama-spm.model"), "LLaMA's 32,000-piece vocabulary")
    row(ax, y - 1.9, Tokenizer(default_model_dir() / "tokenizer.model"), "the default model's 4,096-piece vocabulary")
    shown = TEXT.replace("\U0001F999", "[U+1F999 LLAMA]")  # the font has no llama glyph; the boxes show its bytes
    ax.text(0.3, 0.2, f"text: {shown!r}", fontsize=8.5, color="#4a5568", family="DejaVu Sans Mono")
    return save(fig, out_dir, "tokenization.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
