"""Figure: three of the LLaMA paper's results against model size.

    python docs/figures/make_results.py [OUT_DIR]     writes OUT_DIR/results.png (default docs/figures/)

Data: docs/data/llama_paper_tables.json (Touvron et al. 2023, Tables 3, 4 and 9). For each model with a number,
its score against its parameter count (read from its name, e.g. "PaLM 62B"), LLaMA's sizes joined by a line:
HellaSwag zero-shot accuracy (Table 3), NaturalQuestions 64-shot exact match (Table 4) and MMLU 5-shot average
(Table 9).
"""

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "data" / "llama_paper_tables.json"
PANELS = [("table3", "HellaSwag", "HellaSwag, zero-shot accuracy (Table 3)"),
          ("table4", "64-shot", "NaturalQuestions, 64-shot exact match (Table 4)"),
          ("table9", "Average", "MMLU, 5-shot average accuracy (Table 9)")]
FAMILY_COLOURS = {"LLaMA": "#dd6b20", "GPT-3": "#3182ce", "Gopher": "#805ad5", "Chinchilla": "#38a169",
                  "PaLM": "#e53e3e", "PaLM-cont": "#e53e3e", "GPT-NeoX": "#718096"}


def params_of(name: str) -> float:
    m = re.search(r"([\d.]+)B$", name)
    if not m:
        raise ValueError(f"{DATA.name}: cannot read a parameter count from the model name {name!r}")
    return float(m.group(1)) * 1e9


def main(out_dir: Path) -> Path:
    if not DATA.is_file():
        raise FileNotFoundError(f"{DATA}: the paper's tables are missing")
    tables = json.loads(DATA.read_text())["tables"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), dpi=100)
    for ax, (key, column, title) in zip(axes, PANELS):
        t = tables[key]
        j = t["columns"].index(column)
        llama = []
        for row in t["rows"]:
            name, value = row[0], row[j]
            if value is None:
                continue
            family = name.rsplit(" ", 1)[0]
            n = params_of(name)
            if family == "LLaMA":
                llama.append((n, value))
            ax.semilogx(n, value, "o" if family == "LLaMA" else "s", color=FAMILY_COLOURS.get(family, "#4a5568"), ms=7)
            ax.annotate(name, (n, value), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.semilogx(*zip(*sorted(llama)), "-", color=FAMILY_COLOURS["LLaMA"], lw=1.5)
        ax.set(title=title, xlabel="parameters")
        ax.title.set_fontsize(9.5)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("score")
    fig.suptitle("LLaMA (orange line) against the models the paper compares it with", fontsize=11)
    fig.tight_layout()
    out = Path(out_dir) / "results.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    try:
        print(main(out_dir))
    except (OSError, ValueError) as e:
        print(f"make_results.py: error: {e}", file=sys.stderr)
        sys.exit(2)
