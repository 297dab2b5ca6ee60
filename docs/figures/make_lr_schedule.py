"""Figure: LLaMA's learning-rate schedule (Touvron et al. 2023, section 2.3).

    python docs/figures/make_lr_schedule.py [OUT_DIR]     writes OUT_DIR/lr_schedule.png (default docs/figures/)

The paper: AdamW, 2,000 linear warmup steps, then a cosine decay to 10% of the peak learning rate; batches of
4M tokens, so 1.0T tokens are 250,000 steps (6.7B and 13B, peak 3e-4) and 1.4T tokens are 350,000 steps
(32.5B and 65.2B, peak 1.5e-4).
"""

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WARMUP, FINAL_FRACTION, TOKENS_PER_STEP = 2000, 0.1, 4_000_000
SIZES = [("6.7B and 13.0B", 3e-4, 1.0e12), ("32.5B and 65.2B", 1.5e-4, 1.4e12)]


def schedule():
    """lr(step, peak, total_steps): the training code's own function when it exists, else the paper's formula."""
    try:
        from annotated_llama.train.loop import TrainConfig, lr_at  # the pretraining code's schedule
    except ImportError:
        lr_at = None
    if lr_at is not None:
        def ours(step, peak, total):
            cfg = TrainConfig(out_dir="unused", max_steps=total, lr=peak, warmup_steps=WARMUP,
                              min_lr_ratio=FINAL_FRACTION)
            return lr_at(step, cfg)
        return ours, "annotated_llama.train.loop.lr_at"

    # Fallback, for a checkout without the training code: the paper's formula written out.
    def paper(step, peak, total):
        if step < WARMUP:
            return peak * (step + 1) / WARMUP
        progress = min(1.0, (step - WARMUP) / max(1, total - WARMUP))
        return FINAL_FRACTION * peak + (1 - FINAL_FRACTION) * peak * 0.5 * (1 + math.cos(math.pi * progress))
    return paper, "the paper's formula (section 2.3)"


def main(out_dir: Path) -> Path:
    lr, origin = schedule()
    fig, (ax, ax_zoom) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100, gridspec_kw={"width_ratios": [2, 1]})
    for label, peak, tokens in SIZES:
        total = int(tokens / TOKENS_PER_STEP)
        steps = list(range(0, total + 1, max(1, total // 2000)))
        values = [lr(s, peak, total) for s in steps]
        ax.plot([s * TOKENS_PER_STEP / 1e12 for s in steps], values, lw=2,
                label=f"{label}: peak {peak:g}, {tokens / 1e12:.1f}T tokens = {total:,} steps")
        early = list(range(0, 6001, 20))
        ax_zoom.plot(early, [lr(s, peak, total) for s in early], lw=2)
    ax.set(xlabel="tokens seen (trillions)", ylabel="learning rate",
           title="Cosine decay to 10% of the peak (batch of 4M tokens)")
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    ax_zoom.axvline(WARMUP, color="grey", ls=":")
    ax_zoom.text(WARMUP * 1.05, 0.2e-4, "end of warmup\n(2,000 steps)", fontsize=8, color="grey")
    ax_zoom.set(xlabel="optimizer step", ylabel="learning rate", title="The first 6,000 steps")
    ax_zoom.grid(alpha=0.3)
    fig.suptitle(f"LLaMA's learning-rate schedule (computed with {origin})", fontsize=11)
    fig.tight_layout()
    out = Path(out_dir) / "lr_schedule.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(main(out_dir))
