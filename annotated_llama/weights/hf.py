"""HF transformers layout <-> Meta's: one rename table plus the rotary permutation of wq/wk.

Meta rotates interleaved pairs (x[2i], x[2i+1]); HF's `rotate_half` pairs x[i] with
x[i + D/2]. HF's converter (convert_llama_weights_to_hf.py) therefore reorders the output
rows of wq and wk within each head, so the same weights give the same attention scores.
Forgetting it still runs, but the text turns to gibberish after ~20 tokens (REFERENCE b2).
"""

from __future__ import annotations

import torch

from ..config import ModelArgs

# Meta name -> HF name; "{}" is the layer index. Data, not code (STYLE 7).
META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
HF_TO_META = {v: k for k, v in META_TO_HF.items()}


def _template(name: str) -> tuple[str, str | None]:
    # "layers.3.attention.wq.weight" -> ("layers.{}.attention.wq.weight", "3")
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i] + ["{}"] + parts[i + 1:]), p
    return name, None


def rename(name: str, table: dict[str, str]) -> str:
    template, layer = _template(name)
    if template not in table:
        raise KeyError(f"unexpected tensor name {name!r}")
    return table[template].format(layer) if layer is not None else table[template]


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Within each head, rows (0,1),(2,3),... (Meta's pairs) become rows (i, i + D/2) (HF's).
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in sd.items():
        if name.endswith("attention.wq.weight"):
            w = permute_to_hf(w, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_hf(w, args.n_kv_heads)  # GQA: per kv head
        out[rename(name, META_TO_HF)] = w
    return out


def hf_to_meta_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for name, w in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old transformers versions saved
            continue
        meta = rename(name, HF_TO_META)
        if meta.endswith("attention.wq.weight"):
            w = permute_to_meta(w, args.n_heads)
        elif meta.endswith("attention.wk.weight"):
            w = permute_to_meta(w, args.n_kv_heads)
        out[meta] = w
    return out
