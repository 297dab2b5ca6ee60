"""Figure: training and validation loss of the embedded default model.

    python docs/figures/make_loss_curve.py [OUT_DIR] [--log PATH]
        writes OUT_DIR/loss_curve.png (default docs/figures/) from PATH
        (default docs/figures/default_model_log.jsonl, the pretraining run's OUT/log.jsonl)

The log is the one `annotated-llama pretrain` writes: one JSON object per line, training records with
`step` and `loss` (and `tokens`), evaluation records with `step` and `val_loss`. A missing or empty log is
an error: this figure is never drawn from made-up numbers.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

HERE = Path(__file__).resolve().parent


def read_log(path: Path) -> tuple[list[dict], list[dict]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: training log not found (the default model's pretraining run writes it)")
    train, val = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not a JSON object ({e})") from None
        if "val_loss" in rec:
            val.append(rec)
        elif "loss" in rec and math.isfinite(rec["loss"]):
            train.append(rec)
    if not train or not val:
        raise ValueError(f"{path}: needs training records (step, loss) and evaluation records (step, val_loss); "
                         f"found {len(train)} and {len(val)}")
    return train, val


def main(out_dir: Path, log: Path) -> Path:
    train, val = read_log(log)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=100)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.8, label="training loss")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", lw=2, ms=4,
            label="validation loss (held-out documents)")
    last = val[-1]
    ax.annotate(f"{last['val_loss']:.3f} (perplexity {math.exp(last['val_loss']):.1f})",
                xy=(last["step"], last["val_loss"]), xytext=(-10, 25), textcoords="offset points", ha="right",
                arrowprops=dict(arrowstyle="->", color="grey"), fontsize=9)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per token)",
           title="The default model: pretraining on the World English Bible")
    if "tokens" in train[-1]:
        ax.text(0.99, 0.97, f"{train[-1]['tokens']:,} training tokens in {train[-1]['step']:,} steps",
                transform=ax.transAxes, ha="right", va="top", fontsize=9, color="grey")
    ax.set_yscale("log")
    for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis_formatter(FormatStrFormatter("%.1f"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper right", bbox_to_anchor=(1, 0.9))
    fig.tight_layout()
    out = Path(out_dir) / "loss_curve.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="draw the default model's loss curve")
    ap.add_argument("out_dir", nargs="?", type=Path, default=HERE)
    ap.add_argument("--log", type=Path, default=HERE / "default_model_log.jsonl")
    args = ap.parse_args()
    try:
        print(main(args.out_dir, args.log))
    except (OSError, ValueError) as e:
        print(f"make_loss_curve.py: error: {e}", file=sys.stderr)
        sys.exit(2)
