"""Figure: decode and prefill speed of our model against HF transformers and llama.cpp.

    python docs/figures/make_speed_chart.py [OUT_DIR] [--results PATH]
        writes OUT_DIR/speed.png (default docs/figures/) from PATH (default bench/results.json,
        written by `python bench/bench_engines.py`)

Left: batch-1 decode tokens per second for each engine, with the memory-bandwidth ceiling of its weight format
(bandwidth / bytes of weights read per token) drawn over each bar. Right: prefill tokens per second of a 512-token
prompt. The numbers are the benchmark's medians, on the machine and the commit its JSON names; engines that failed
are listed, not drawn. A missing results file is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent.parent / "bench" / "results.json"
COLOURS = {"ours": "#2b6cb0", "hf": "#dd6b20", "llama.cpp": "#38a169"}


def family(engine: str) -> str:
    return next((f for f in COLOURS if engine.startswith(f)), "other")


def read_results(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark results not found (run python bench/bench_engines.py)")
    try:
        res = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("engines"), dict):
        raise ValueError(f"{path}: expected an object with an 'engines' table")
    ok = {e: r for e, r in res["engines"].items() if isinstance(r, dict) and "decode_tok_s" in r}
    if not ok:
        raise ValueError(f"{path}: no engine has a decode_tok_s measurement")
    return res


def main(out_dir: Path, results: Path) -> Path:
    res = read_results(results)
    engines = {e: r for e, r in res["engines"].items() if isinstance(r, dict) and "decode_tok_s" in r}
    failed = [e for e in res["engines"] if e not in engines]
    names = list(engines)
    fig, (ax_d, ax_p) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100, gridspec_kw={"width_ratios": [3, 2]})

    colours = [COLOURS.get(family(e), "grey") for e in names]
    decode = [engines[e]["decode_tok_s"] for e in names]
    bars = ax_d.bar(range(len(names)), decode, color=colours)
    for i, e in enumerate(names):
        ceiling = engines[e].get("ceiling_tok_s")
        if ceiling:
            ax_d.plot([i - 0.4, i + 0.4], [ceiling, ceiling], color="black", lw=1.5, ls="--")
    ax_d.bar_label(bars, [f"{v:.0f}" for v in decode], fontsize=8)
    ax_d.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax_d.set(ylabel="tokens per second", title="Decode, batch 1 (dashed: bandwidth ceiling of the format)")
    ax_d.grid(axis="y", alpha=0.3)

    prefill = [(e, engines[e]["prefill_tok_s"]) for e in names if engines[e].get("prefill_tok_s")]
    pbars = ax_p.bar(range(len(prefill)), [v for _, v in prefill],
                     color=[COLOURS.get(family(e), "grey") for e, _ in prefill])
    ax_p.bar_label(pbars, [f"{v:.0f}" for _, v in prefill], fontsize=8)
    ax_p.set_xticks(range(len(prefill)), [e for e, _ in prefill], rotation=30, ha="right", fontsize=8)
    ax_p.set(ylabel="tokens per second", title=f"Prefill of a {res.get('prompt_len', '?')}-token prompt")
    ax_p.grid(axis="y", alpha=0.3)

    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax_p.legend(handles, list(COLOURS), fontsize=8, loc="upper right")
    params = res.get("params")
    where = (f"{res.get('preset', '?')} shape ({params / 1e6:.0f}M parameters, random weights), "
             if params else f"{res.get('preset', '?')}, ")
    note = (f"{where}{res.get('threads', '?')} CPU threads, {res.get('bandwidth_gb_s', float('nan')):.0f} GB/s "
            f"measured bandwidth; bench/bench_engines.py at {res.get('commit', '?')}, {res.get('date_utc', '')}")
    if failed:
        note += f"; not run: {', '.join(failed)}"
    fig.suptitle("Speed on this machine: annotated-llama against HF transformers and llama.cpp", fontsize=11)
    fig.text(0.5, 0.005, note, ha="center", fontsize=8, color="grey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out = Path(out_dir) / "speed.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="draw the engine speed comparison")
    ap.add_argument("out_dir", nargs="?", type=Path, default=HERE)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    try:
        print(main(args.out_dir, args.results))
    except (OSError, ValueError) as e:
        print(f"make_speed_chart.py: error: {e}", file=sys.stderr)
        sys.exit(2)
