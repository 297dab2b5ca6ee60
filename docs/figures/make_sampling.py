"""Figure: temperature and top-p on a real next-token distribution.

    python docs/figures/make_sampling.py [OUT_DIR]     writes OUT_DIR/sampling.png (default docs/figures/)

The embedded default model (annotated_llama/default_model) reads "And God said, Let there be"; each panel shows
the 25 most likely next tokens after dividing the logits by a temperature T (0.6, Meta's default; 1.0; 1.5), as
probabilities. The tokens that top-p = 0.9 keeps (the smallest set of most likely tokens whose mass reaches 0.9;
annotated_llama.core.sampling.top_p_mask, Meta's rule) are drawn dark; the rest, which top-p sets to zero, light. Each
panel's title gives how many of the 4,096 tokens top-p keeps and the entropy of the distribution.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
PROMPT = "And God said, Let there be"
TEMPERATURES, TOP_P, SHOWN = (0.6, 1.0, 1.5), 0.9, 25


def main(out_dir: Path) -> Path:
    from annotated_llama import load_model
    from annotated_llama.default_model import default_model_dir
    from annotated_llama.core.sampling import top_p_mask

    model, tok = load_model(default_model_dir(), dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([tok.encode(PROMPT, bos=True, eos=False)]), cache=False)[0, -1]  # (V,)
    order = logits.argsort(descending=True)[:SHOWN]
    labels = [tok.id_to_piece(int(i)).replace("\u2581", "_") for i in order]
    fig, axes = plt.subplots(1, len(TEMPERATURES), figsize=(15, 4.6), dpi=100, sharey=True)
    for ax, T in zip(axes, TEMPERATURES):
        probs = (logits / T).softmax(-1)
        sorted_probs, sorted_ids = probs.sort(descending=True)
        dropped = top_p_mask(sorted_probs[None], TOP_P)[0]
        kept_ids = set(sorted_ids[~dropped].tolist())
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum().item()
        colours = ["#2b6cb0" if int(i) in kept_ids else "#bee3f8" for i in order]
        ax.bar(range(SHOWN), probs[order].numpy(), color=colours)
        ax.set_xticks(range(SHOWN), labels, rotation=90, fontsize=7)
        ax.set_title(f"T = {T}: top-p {TOP_P} keeps {len(kept_ids)} tokens; entropy {entropy:.2f} nats", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("probability of the next token")
    fig.suptitle(f"The default model's next token after {PROMPT!r}: the 25 most likely, at three temperatures "
                 f"(dark: kept by top-p {TOP_P})", fontsize=10.5)
    fig.tight_layout()
    out = Path(out_dir) / "sampling.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    print(main(out_dir))
