"""Figure: rooflines of the two machines the benchmarks ran on, with the measured points.

    python docs/figures/make_roofline.py [OUT_DIR]     writes OUT_DIR/roofline.png (default docs/figures/)

The roofline model (Williams, Waterman & Patterson 2009): a kernel that does I FLOPs per byte it reads from memory
can run at most at min(peak FLOP/s, I x bandwidth). Left: the 2-core CPU of bench/RESULTS.md sections 1 and 4,
from bench/results.json (commit 642e8ea, 134M-parameter bench-134m shape): measured read bandwidth from the JSON;
peaks are the measured 2-thread matmul peaks the training loop uses for MFU (annotated_llama/train/loop.py
PEAK_FLOPS: 410 GFLOP/s bfloat16, 170 float32). Right: one NVIDIA H200, from bench/gpu/gpu_7b_h200_run1.json and
run2_int.json (llama-7b shape, 2026-11-28): the measured copy bandwidth from the JSON and NVIDIA's dense bfloat16
peak of 989 TFLOP/s. Points: FLOPs per token = 2 x (parameters - embedding), the multiply-adds of every matmul;
bytes per token = the weight bytes each token reads (for batch-1 decode: all of them; for a batch of b rows or a
512-token prefill: a b-th or a 512th of them). Achieved FLOP/s = measured tokens/s x FLOPs per token.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent.parent / "bench"
CPU_PEAKS = {"bfloat16": 410e9, "float32": 170e9}  # annotated_llama/train/loop.py PEAK_FLOPS ("cpu", ...)
H200_BF16_PEAK = 989e12  # NVIDIA H200 SXM datasheet, dense bfloat16
CPU_ENGINES = ["ours-f32-compiled", "ours-bf16-compiled", "ours-int8-compiled", "llama.cpp-F32", "llama.cpp-F16",
               "llama.cpp-Q8_0", "hf-f32", "hf-bf16"]


def load(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark results not found")
    return json.loads(path.read_text())


def roof(ax, bandwidth, peaks, label_unit):
    intensity = np.logspace(-1.5, 3.5, 200)
    for name, peak in peaks.items():
        ax.loglog(intensity, np.minimum(peak, intensity * bandwidth), "-", color="#2d3748" if name != "float32" else
                  "#718096", lw=1.8, label=f"roof: {peak / 1e12 if peak > 1e12 else peak / 1e9:.0f} "
                  f"{'TFLOP/s' if peak > 1e12 else 'GFLOP/s'} {name}, {bandwidth / 1e9:,.0f} GB/s")
    ax.set(xlabel="arithmetic intensity (FLOPs per byte of weights read)", ylabel=f"achieved {label_unit}")
    ax.grid(alpha=0.25, which="both")


def main(out_dir: Path) -> Path:
    cpu = load(BENCH / "results.json")
    gpu_runs = [load(BENCH / "gpu" / "gpu_7b_h200_run1.json"), load(BENCH / "gpu" / "gpu_7b_h200_run2_int.json")]
    fig, (ax_c, ax_g) = plt.subplots(1, 2, figsize=(15, 5.6), dpi=100)

    # CPU: 134M shape
    bw = cpu["bandwidth_gb_s"] * 1e9
    vocab_dim = 32000 * 768  # bench-134m: the embedding lookup is no matmul
    flops_tok = 2 * (cpu["params"] - vocab_dim)
    roof(ax_c, bw, CPU_PEAKS, "FLOP/s")
    colours = {"ours": "#2b6cb0", "llama.cpp": "#38a169", "hf": "#dd6b20"}
    for name in CPU_ENGINES:
        e = cpu["engines"][name]
        colour = next(c for k, c in colours.items() if name.startswith(k))
        bytes_tok = bw / e["ceiling_tok_s"]  # the benchmark's ceiling is bandwidth / weight bytes per token
        ax_c.loglog(flops_tok / bytes_tok, e["decode_tok_s"] * flops_tok, "o", color=colour, ms=7)
        ours = not name.startswith("llama.cpp")  # labelled below right; llama.cpp's above left: no overlaps
        ax_c.annotate(f"{name} decode", (flops_tok / bytes_tok, e["decode_tok_s"] * flops_tok), fontsize=6.5,
                      textcoords="offset points", xytext=(6, -10) if ours else (-6, 4), ha="left" if ours else "right")
        ax_c.loglog(512 * flops_tok / bytes_tok, e["prefill_tok_s"] * flops_tok, "^", color=colour, ms=7)
    batched = cpu["engines"]["ours-bf16-compiled"].get("batched_tok_s") or {}
    bytes_bf16 = bw / cpu["engines"]["ours-bf16-compiled"]["ceiling_tok_s"]
    for b, tok_s in sorted(batched.items(), key=lambda kv: int(kv[0])):
        ax_c.loglog(int(b) * flops_tok / bytes_bf16, tok_s * flops_tok, "s", color="#805ad5", ms=6)
        ax_c.annotate(f"batch {b}", (int(b) * flops_tok / bytes_bf16, tok_s * flops_tok), fontsize=6.5,
                      textcoords="offset points", xytext=(6, 3))
    ax_c.plot([], [], "o", color="#4a5568", label="batch-1 decode (circles)")
    ax_c.plot([], [], "^", color="#4a5568", label="512-token prefill (triangles)")
    ax_c.plot([], [], "s", color="#805ad5", label="ours-bf16-compiled, batched decode")
    ax_c.set_title(f"2-core CPU, 134M-parameter model (bench/results.json, commit {cpu['commit']})", fontsize=10)
    ax_c.set_ylim(5e8, 2e12)
    ax_c.legend(fontsize=7, loc="upper left")

    # GPU: llama-7b shape on an H200
    gbw = gpu_runs[0]["copy_gb_s"] * 1e9
    flops7 = 2 * (gpu_runs[0]["params"] - 32000 * 4096)
    roof(ax_g, gbw, {"bfloat16": H200_BF16_PEAK}, "FLOP/s")
    seen = set()
    for run in gpu_runs:
        for r in run["results"]:
            if r.get("decode_tok_s") is None:
                continue
            key = (r["mode"], r["compile"], round(r["decode_tok_s"]))
            if key in seen:
                continue
            seen.add(key)
            intensity = flops7 / (r["weight_gb_per_token"] * 1e9)
            ax_g.loglog(intensity, r["decode_tok_s"] * flops7, "o", color="#2b6cb0" if r["compile"] else "#a0aec0", ms=7)
            ax_g.annotate(f"{r['mode']} {'compiled' if r['compile'] else 'eager'}: {r['decode_tok_s']:.0f} tok/s",
                          (intensity, r["decode_tok_s"] * flops7), fontsize=7, textcoords="offset points",
                          xytext=(6, -3))
    ax_g.set_title("NVIDIA H200, llama-7b shape, batch-1 decode (bench/gpu/, 2026-11-28)", fontsize=10)
    ax_g.set_ylim(1e11, 2e15)
    ax_g.legend(fontsize=7, loc="upper left")
    fig.suptitle("Rooflines with measured points: batch-1 decoding sits on the bandwidth slope, prefill near the "
                 "compute roof", fontsize=11)
    fig.tight_layout()
    out = Path(out_dir) / "roofline.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    try:
        print(main(out_dir))
    except (OSError, ValueError, KeyError) as e:
        print(f"make_roofline.py: error: {e}", file=sys.stderr)
        sys.exit(2)
