"""Where every tensor of a LLaMA checkpoint lives, in each layout we read and write: one table.

Meta's names (meta-llama/llama model.py) are ours. Hugging Face's are those of transformers'
modeling_llama.py (written by its convert_llama_weights_to_hf.py), llama.cpp's those of its
convert_hf_to_gguf.py (gguf-py constants.py, MODEL_TENSOR names). The last column is the dim
Meta's model-parallel ranks split a tensor on in `consolidated.NN.pth` (fairscale's layers, as in
Megatron-LM, Shoeybi et al. 2019): column-parallel layers (wq, wk, wv, w1, w3, output) split
their output rows (dim 0), row-parallel layers (wo, w2) their input columns (dim 1), norms are
replicated (None). LLaMA 1/2's ParallelEmbedding splits the embedding dim (1); Llama 3's
VocabParallelEmbedding splits the vocabulary (0), see `shard_dim`.

Meta rotates interleaved pairs (x[2i], x[2i+1]); HF's `rotate_half` pairs x[i] with x[i + D/2].
HF's converter therefore reorders the output rows of wq and wk within each head
(`permute_to_hf`), so the same weights give the same attention scores. Forgetting it still runs,
but the text turns to gibberish after ~20 tokens (transformers #25199, llama.cpp #2376).
"""

from __future__ import annotations

import re

import torch

# Meta name template ("{}": the layer index) -> (HF name, GGUF name, Meta's shard dim)
TENSORS = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", "token_embd.weight", 1),
    "norm.weight": ("model.norm.weight", "output_norm.weight", None),
    "output.weight": ("lm_head.weight", "output.weight", 0),
    "layers.{}.attention.wq.weight": ("model.layers.{}.self_attn.q_proj.weight", "blk.{}.attn_q.weight", 0),
    "layers.{}.attention.wk.weight": ("model.layers.{}.self_attn.k_proj.weight", "blk.{}.attn_k.weight", 0),
    "layers.{}.attention.wv.weight": ("model.layers.{}.self_attn.v_proj.weight", "blk.{}.attn_v.weight", 0),
    "layers.{}.attention.wo.weight": ("model.layers.{}.self_attn.o_proj.weight", "blk.{}.attn_output.weight", 1),
    "layers.{}.feed_forward.w1.weight": ("model.layers.{}.mlp.gate_proj.weight", "blk.{}.ffn_gate.weight", 0),
    "layers.{}.feed_forward.w3.weight": ("model.layers.{}.mlp.up_proj.weight", "blk.{}.ffn_up.weight", 0),
    "layers.{}.feed_forward.w2.weight": ("model.layers.{}.mlp.down_proj.weight", "blk.{}.ffn_down.weight", 1),
    "layers.{}.attention_norm.weight": ("model.layers.{}.input_layernorm.weight", "blk.{}.attn_norm.weight", None),
    "layers.{}.ffn_norm.weight": ("model.layers.{}.post_attention_layernorm.weight", "blk.{}.ffn_norm.weight", None),
}
META_TO_HF = {meta: hf for meta, (hf, _, _) in TENSORS.items()}
HF_TO_META = {hf: meta for meta, hf in META_TO_HF.items()}
META_TO_GGUF = {meta: gguf for meta, (_, gguf, _) in TENSORS.items()}
GGUF_TO_META = {gguf: meta for meta, gguf in META_TO_GGUF.items()}
SHARD_DIM = {meta: dim for meta, (_, _, dim) in TENSORS.items()}
SHARD_NAME = re.compile(r"consolidated\.(\d+)\.pth$")  # Meta's rank-NN file

# The linear layers of a block by their short name (LoRA's targets): "wq" -> its parent module
# in our model ("attention") and in HF's ("self_attn"), and HF's module name ("q_proj").
LINEARS = {meta.split(".")[3]: (meta.split(".")[2], hf.split(".")[3], hf.split(".")[4])
           for meta, (hf, _, _) in TENSORS.items() if meta.count(".") == 4}


def template(name: str) -> tuple[str, str | None]:
    """"layers.3.attention.wq.weight" -> ("layers.{}.attention.wq.weight", "3")."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i] + ["{}"] + parts[i + 1:]), p
    return name, None


def rename(name: str, table: dict[str, str]) -> str:
    """A tensor name through one of the tables above (KeyError naming it when it has no entry)."""
    pattern, layer = template(name)
    if pattern not in table:
        raise KeyError(f"unexpected tensor name {name!r}")
    return table[pattern].format(layer) if layer is not None else table[pattern]


def shard_dim(name: str, vocab_parallel: bool) -> int | None:
    """The dim Meta's ranks split tensor `name` on (None: every rank holds all of it)."""
    pattern, _ = template(name)
    if pattern not in SHARD_DIM:
        raise KeyError(name)
    if pattern == "tok_embeddings.weight" and vocab_parallel:
        return 0
    return SHARD_DIM[pattern]


def vocab_parallel(embedding_shard_shape, dim: int, n_shards: int) -> bool:
    """Whether Meta's shards split the embedding by vocabulary (Llama 3: each shard (V/S, C))
    rather than by its dim (LLaMA 1/2: (V, C/S)), from one shard's embedding shape."""
    return n_shards > 1 and embedding_shard_shape[1] == dim


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Within each head, rows (0,1),(2,3),... (Meta's pairs) become rows (i, i + D/2) (HF's).
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)


def permute_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)  # (H*D, C)
