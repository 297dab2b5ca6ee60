"""Figure: parameters against training tokens, with Chinchilla's compute-optimal line and the LLaMA models.

    python docs/figures/make_chinchilla.py [OUT_DIR]     writes OUT_DIR/chinchilla.png (default docs/figures/)

Data: docs/data/chinchilla.csv (each model's paper; Hoffmann et al. 2022, Table 3, for the compute-optimal points).
Left: each model at (parameters, training tokens), log-log, with Hoffmann et al.'s compute-optimal sizes (about 20
tokens per parameter) and dotted lines of equal training compute C = 6ND. Right: the loss Hoffmann et al. fitted,
L(N, D) = E + A / N^alpha + B / D^beta (their approach 3: E 1.69, A 406.4, B 410.7, alpha 0.34, beta 0.28), along
the training of each LLaMA size; an open circle marks 20 tokens per parameter, a dot the size's actual token count.
The fit was made on Chinchilla's data and tokenizer: its absolute values do not carry over to LLaMA, only its shape.
"""

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "chinchilla.csv"
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
OFFSETS = {"GPT-3 175B": (-30, -13), "Gopher 280B": (6, 4), "LLaMA 33B": (-20, 8), "LLaMA 65B": (6, -12),
           "Chinchilla 70B": (8, 2), "Llama 2 70B": (6, 4), "LLaMA 7B": (-18, -13), "LLaMA 13B": (6, -10)}


def read(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the model table is missing")
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    return [dict(r, params=float(r["params"]), tokens=float(r["tokens"])) for r in csv.DictReader(lines)]


def main(out_dir: Path) -> Path:
    rows = read(DATA)
    fig, (ax, ax_l) = plt.subplots(1, 2, figsize=(14, 5.4), dpi=88)
    N = np.logspace(8.5, 12.2, 50)
    for C in (1e21, 1e22, 1e23, 1e24, 1e25):
        ax.loglog(N, C / (6 * N), ":", color="#a0aec0", lw=0.8)
        n_label = C / (6 * 2.5e13)  # where the line meets the top of the plot
        if 3e8 < n_label < 1.5e12:
            ax.text(n_label * 1.08, 2.5e13, f"C = {C:.0e} FLOPs", fontsize=7, color="#718096", va="top")
    opt = [r for r in rows if r["kind"] == "optimal"]
    ax.loglog([r["params"] for r in opt], [r["tokens"] for r in opt], "-", color="#2d3748", lw=2,
              label="compute-optimal (Hoffmann et al. 2022, Table 3)")
    for r in (r for r in rows if r["kind"] == "model"):
        llama = r["name"].startswith(("LLaMA", "Llama"))
        ax.loglog(r["params"], r["tokens"], "o" if llama else "s", ms=8 if llama else 6,
                  color="#dd6b20" if r["name"].startswith("LLaMA") else ("#805ad5" if llama else "#3182ce"))
        ax.annotate(r["name"], (r["params"], r["tokens"]), textcoords="offset points",
                    xytext=OFFSETS.get(r["name"], (6, -3)), fontsize=7.5)
    ax.set(xlabel="parameters N", ylabel="training tokens D", xlim=(3e8, 1.5e12), ylim=(5e9, 5e13),
           title="Models by size and training tokens (dotted: equal compute 6ND)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.2, which="both")

    D = np.logspace(10.5, 13.2, 200)
    for r, colour in zip([r for r in rows if r["name"].startswith("LLaMA")], ("#f6ad55", "#dd6b20", "#c05621", "#7b341e")):
        n = r["params"]
        ax_l.semilogx(D, E + A / n ** ALPHA + B / D ** BETA, color=colour, lw=2, label=r["name"])
        ax_l.plot(20 * n, E + A / n ** ALPHA + B / (20 * n) ** BETA, "o", mfc="white", color=colour, ms=8)
        ax_l.plot(r["tokens"], E + A / n ** ALPHA + B / r["tokens"] ** BETA, "o", color=colour, ms=8)
    ax_l.set(xlabel="training tokens D", ylabel="fitted loss L(N, D) (nats, Chinchilla's data)",
             title="Hoffmann et al.'s fitted loss along each LLaMA size\n(open: 20 tokens/parameter; filled: LLaMA's run)")
    ax_l.legend(fontsize=8)
    ax_l.grid(alpha=0.3, which="both")
    fig.tight_layout()
    out = Path(out_dir) / "chinchilla.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    try:
        print(main(out_dir))
    except (OSError, ValueError) as e:
        print(f"make_chinchilla.py: error: {e}", file=sys.stderr)
        sys.exit(2)
