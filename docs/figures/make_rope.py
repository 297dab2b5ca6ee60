"""Figure: rotary position embeddings (Su et al. 2021, RoFormer) as LLaMA uses them.

    python docs/figures/make_rope.py [OUT_DIR]     writes OUT_DIR/rope.png (default docs/figures/)

Left: the wavelength (tokens per full turn) of each of the D/2 = 64 rotating pairs of a 128-dim head, for
LLaMA (theta 10,000), Llama 3 (500,000) and Llama 3.1's rescaled frequencies. Middle: pair i = 1 of a query in a
16-dimensional head (head_dim 16, the tiny preset's), rotated at positions 0..7. Right, for a 128-dim head: the
score q.k of a query and a key of ones placed at three absolute positions, against their distance, divided by
its value at distance 0 (the three curves coincide: only the relative position counts); and RoFormer's bound
(section 3.4.3), the mean of |S_j| with S_j = sum over l < j of exp(i d theta_l), also relative to distance 0,
which decays with the distance d.
All numbers come from annotated_llama.core.model.
"""

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from annotated_llama import ModelArgs  # noqa: E402
from annotated_llama.core.model import apply_rope, precompute_rope, rope_frequencies  # noqa: E402


def main(out_dir: Path) -> Path:
    fig, (ax_w, ax_r, ax_s) = plt.subplots(1, 3, figsize=(14, 4.4), dpi=100)

    # wavelengths of the three generations of LLaMA (head_dim 128 in every real size)
    for name, style in (("llama-7b", "-"), ("llama-3-8b", "--"), ("llama-3.1-8b", ":")):
        args = ModelArgs.from_name(name)
        wavelength = 2 * math.pi / rope_frequencies(args)  # (D/2,) tokens per turn
        ax_w.semilogy(wavelength.numpy(), style, lw=2, label=f"{name} (theta {args.rope_theta:,.0f})")
    ax_w.axhline(8192, color="grey", lw=0.8)
    ax_w.text(1, 8192 * 1.3, "8,192: Llama 3's training context", fontsize=8, color="grey")
    ax_w.set(xlabel="pair index i (dimensions 2i, 2i+1)", ylabel="wavelength 2π/θ_i (tokens, log scale)",
             title="Each pair rotates at its own speed")
    ax_w.legend(fontsize=8, loc="upper left")

    # one pair of one query, rotated at positions 0..7 (a fast pair: i = 1 of a 16-dim head)
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8)  # head_dim 16
    cos, sin = precompute_rope(args, 64)  # (P, D/2)
    q = torch.zeros(1, 1, 1, args.head_dim)
    q[..., 2], q[..., 3] = 1.0, 0.35  # pair i = 1
    colours = plt.cm.viridis(torch.linspace(0, 0.9, 8).numpy())
    for pos in range(8):
        r = apply_rope(q, cos[pos:pos + 1][None], sin[pos:pos + 1][None])[0, 0, 0]  # (D,)
        ax_r.annotate("", xy=(r[2], r[3]), xytext=(0, 0),
                      arrowprops=dict(arrowstyle="-|>", color=colours[pos], lw=2))
        ax_r.text(r[2] * 1.15, r[3] * 1.15, f"m={pos}", fontsize=8, ha="center", va="center")
    theta = rope_frequencies(args)[1].item()
    ax_r.add_patch(plt.Circle((0, 0), math.hypot(1, 0.35), fill=False, ls=":", color="grey"))
    ax_r.set(xlim=(-1.35, 1.35), ylim=(-1.35, 1.35), aspect="equal", xlabel="x[2]", ylabel="x[3]",
             title=f"Pair i = 1 of a head_dim-{args.head_dim} head, turned by m·θ_1\n(θ_1 = {theta:.3f} rad per position)")

    # q.k depends on the distance n - m only, and tends to decay with it
    args = ModelArgs.from_name("llama-7b")
    cos, sin = precompute_rope(args, 2048)
    qv = kv = torch.ones(args.head_dim)
    dist = torch.arange(0, 512)
    for m0, style, lw in ((0, "-", 4), (300, "--", 1.5), (1000, ":", 1.5)):
        m = torch.full_like(dist, m0)
        n = m + dist
        qr = apply_rope(qv.expand(1, len(dist), 1, -1), cos[m][None], sin[m][None])  # (1, N, 1, D)
        kr = apply_rope(kv.expand(1, len(dist), 1, -1), cos[n][None], sin[n][None])
        score = (qr * kr).sum(-1).flatten()
        ax_s.plot(dist.numpy(), (score / score[0]).numpy(), style, lw=lw, color="#3182ce",
                  label=f"q·k, q = k = 1, query at m = {m0}")
    freqs = rope_frequencies(args).double()
    bound = torch.stack([torch.cumsum(torch.exp(1j * d * freqs), 0).abs().mean() for d in dist.double()])
    ax_s.plot(dist.numpy(), (bound / bound[0]).numpy(), color="#dd6b20", lw=2,
              label="RoFormer's bound: mean |S_j| (section 3.4.3)")
    ax_s.axhline(0, color="grey", lw=0.6)
    ax_s.set(xlabel="distance n - m (tokens)", ylabel="relative to distance 0",
             title=f"Scores against distance (head_dim {args.head_dim})")
    ax_s.legend(fontsize=7.5)

    fig.suptitle("Rotary position embeddings in LLaMA (annotated_llama.core.model)", fontsize=12)
    fig.tight_layout()
    out = Path(out_dir) / "rope.png"
    fig.savefig(out, pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


if __name__ == "__main__":
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent
    print(main(out_dir))
