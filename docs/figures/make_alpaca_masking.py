"""Figure: Alpaca's label masking on one record, tokenized with LLaMA's own tokenizer.

    python docs/figures/make_alpaca_masking.py [OUT_DIR]   writes OUT_DIR/alpaca_masking.png (default docs/figures/)

One record rendered with stanford_alpaca's prompt template (annotated_llama.data.alpaca.encode_record, the package's
code): the model reads every token (top row), but the labels (bottom row) are -100 for the prompt, which
cross_entropy ignores, and the answer's own ids followed by EOS, so the model is trained to write answers and to
end them. Long runs of prompt tokens are elided in the middle. The tokenizer is LLaMA 1/2's 32,000-piece
SentencePiece model shipped in tests/assets.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matplotlib.patches import Rectangle  # noqa: E402

from _draw import COLOURS, canvas, out_dir_from_argv, save  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECORD = {"instruction": "Reverse the order of this list.", "input": "bread, water, lamb", "output": "lamb, water, bread"}


def main(out_dir: Path) -> Path:
    from annotated_llama import Tokenizer
    from annotated_llama.data.alpaca import IGNORE_INDEX, encode_record

    tok = Tokenizer(REPO / "tests" / "assets" / "llama-spm.model")
    ex = encode_record(tok, RECORD)
    n_prompt = ex.labels.count(IGNORE_INDEX)
    keep = list(range(8)) + [None] + list(range(n_prompt - 9, len(ex.ids)))  # elide the middle of the prompt
    fig, ax = canvas(16, 4.6)
    ax.set_ylim(-0.5, 4.1)
    w, x0 = 0.6, 0.4
    ax.text(x0, 3.85, f"One Alpaca record: {len(ex.ids)} tokens, {n_prompt} of them prompt (label -100), "
            f"{len(ex.ids) - n_prompt} trained on (the answer and EOS)", fontsize=11, weight="bold")
    for col, i in enumerate(keep):
        x = x0 + col * w
        if i is None:
            ax.text(x + w / 2, 2.5, "...", ha="center", va="center", fontsize=12)
            ax.text(x + w / 2, 1.3, "...", ha="center", va="center", fontsize=12)
            continue
        piece = tok.id_to_piece(ex.ids[i]).replace("\u2581", "_")
        prompt = ex.labels[i] == IGNORE_INDEX
        ax.add_patch(Rectangle((x, 2.05), w, 0.95, facecolor=COLOURS["prompt"] if prompt else COLOURS["gen"],
                               edgecolor="#2d3748", lw=0.8))
        ax.text(x + w / 2, 2.52, piece, ha="center", va="center", fontsize=6.5, rotation=90 if len(piece) > 4 else 0)
        ax.add_patch(Rectangle((x, 1.0), w, 0.6, facecolor=COLOURS["masked"] if prompt else COLOURS["ffn"],
                               edgecolor="#2d3748", lw=0.8))
        ax.text(x + w / 2, 1.3, "-100" if prompt else str(ex.labels[i]), ha="center", va="center", fontsize=6,
                rotation=90)
    ax.text(x0, 3.12, "input ids (what the model reads)", fontsize=9)
    ax.text(x0, 0.7, "labels (what the loss counts; -100 is ignored by cross_entropy)", fontsize=9, va="top")
    ax.text(x0, -0.2, "labels are shown aligned with the ids, as encode_record stores them; collate() shifts them by one "
            "position, so each position is trained to predict the next token", fontsize=8.5, color="#4a5568")
    ax.text(x0, 0.2, "blue: prompt (template, instruction, input, '### Response:'); orange: the answer, ending with "
            "</s>; green: trained labels", fontsize=8.5, color="#4a5568")
    return save(fig, out_dir, "alpaca_masking.png")


if __name__ == "__main__":
    print(main(out_dir_from_argv()))
