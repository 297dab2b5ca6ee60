"""Speculative decoding: acceptance rate and speed-up over plain greedy decoding of the same model.

    python bench/bench_speculative.py                                 # the embedded default model
    python bench/bench_speculative.py --model DIR --draft DIR2        # a separate small draft model
    python bench/bench_speculative.py --preset tiny --draft-layers 1  # random weights, seconds

Without --draft, the draft is the target's own first --draft-layers layers plus its final norm and
output head ("self-speculative" drafting, as in Zhang et al. 2023, "Draft & Verify"): no second
model needed, and it shares the tokenizer by construction. The output is checked to equal plain
greedy decoding (bench/engines.py's reference loop over `model(tokens, start_pos)`) before any
time counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotated_llama import ModelArgs, Transformer  # noqa: E402
from annotated_llama.inference.speculative import speculative_generate  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import reference_greedy as greedy_generate  # noqa: E402  (Meta's forward contract, no stop ids)


def truncated(model: Transformer, n_layers: int) -> Transformer:
    args = ModelArgs(**{**model.params.__dict__, "n_layers": n_layers})
    draft = Transformer(args).to(model.tok_embeddings.weight.dtype).eval()
    draft.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers})
    return draft


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="target checkpoint (default: the embedded default model)")
    p.add_argument("--preset", help="a random-weight target of this preset instead")
    p.add_argument("--draft", help="draft checkpoint (default: the target's first --draft-layers layers)")
    p.add_argument("--draft-layers", type=int, default=2)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--prompt", default="In the beginning God created the heaven and the earth.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    if a.preset:
        torch.manual_seed(0)
        target = Transformer(ModelArgs.from_name(a.preset)).to(dtype).eval()
        prompt = torch.randint(3, target.params.vocab_size, (12,)).tolist()
    else:
        from annotated_llama import load_model
        path = a.model
        if path is None:
            from annotated_llama.default_model import default_model_dir
            path = default_model_dir()
        target, tok = load_model(path, dtype=a.dtype)
        prompt = tok.encode(a.prompt, bos=True, eos=False)
    if a.draft:
        from annotated_llama import load_model
        draft, _ = load_model(a.draft, dtype=a.dtype)
    else:
        draft = truncated(target, a.draft_layers)
    greedy_generate(target, prompt, 4)  # warm-up
    t0 = time.perf_counter()
    ref = greedy_generate(target, prompt, a.new_tokens)
    plain_s = time.perf_counter() - t0
    out, stats = speculative_generate(target, draft, prompt, a.new_tokens, k=a.k)
    result = {"identical_to_greedy": out == ref, "plain_tok_s": len(ref) / plain_s,
              "speculative_tok_s": len(out) / stats["seconds"], "speed_up": plain_s / stats["seconds"],
              "acceptance_rate": stats["acceptance_rate"], "tokens_per_round": stats["tokens_per_round"],
              "k": a.k, "draft_layers": None if a.draft else a.draft_layers,
              "target_layers": target.params.n_layers, "dtype": a.dtype}
    print(json.dumps(result, indent=1))
    return 0 if result["identical_to_greedy"] else 1


if __name__ == "__main__":
    sys.exit(main())
