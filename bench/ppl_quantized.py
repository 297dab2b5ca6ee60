"""Perplexity of a model before and after int8 / int4 weight-only quantization.

    python bench/ppl_quantized.py                                   # the embedded default model
    python bench/ppl_quantized.py --model DIR --tokens val.bin      # uint16 token file (pretokenize's)

Windows of --seq-len tokens over the validation tokens, non-overlapping; every position after
the first of a window is scored. Targets (issue 8): int8 within +1%, int4 within +5%.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotated_llama.transforms.quantize import quantize_model  # noqa: E402


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, seq_len: int, batch: int = 8) -> float:
    n = len(tokens) // seq_len
    windows = tokens[: n * seq_len].view(n, seq_len)  # (n, T)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = windows[i:i + batch]
        logits = model(x[:, :-1], cache=False)  # (b, T-1, V)
        total += F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        count += x[:, 1:].numel()
    return math.exp(total / count)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the embedded default model)")
    p.add_argument("--tokens", default="/work/runs/default/data/val.bin", help="uint16 token file")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--group-sizes", default="32,64,128", help="int4 group sizes to try")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from annotated_llama import load_model
    path = a.model
    if path is None:
        from annotated_llama.default_model import default_model_dir
        path = default_model_dir()
    model, _ = load_model(path, dtype="float32")
    tokens = torch.from_numpy(np.fromfile(a.tokens, dtype=np.uint16).astype(np.int64))
    seq_len = min(a.seq_len, model.params.max_seq_len)
    base = perplexity(model, tokens, seq_len)
    out = {"model": str(path), "tokens": int(len(tokens)), "seq_len": seq_len, "float32": base}
    variants = [("int8", 128)] + [("int4", int(g)) for g in a.group_sizes.split(",")]
    for mode, g in variants:
        q = quantize_model(copy.deepcopy(model), mode, group_size=g)
        ppl = perplexity(q, tokens, seq_len)
        name = mode if mode == "int8" else f"int4-g{g}"
        out[name] = ppl
        out[name + "_rise_pct"] = 100 * (ppl / base - 1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
