"""The LLaMA transformer, in one file.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", section 2.2:
a decoder-only transformer with three changes to the original (Vaswani et al. 2017):
  - pre-normalization with RMSNorm (Zhang & Sennrich 2019), as in GPT-3;
  - the SwiGLU activation (Shazeer 2020), as in PaLM;
  - rotary position embeddings (Su et al. 2021), as in GPT-NeoX.
Llama 2 adds grouped-query attention (Ainslie et al. 2023) for its 34B and 70B models; Llama 3
uses GQA at every size, rope_theta = 500000, and (3.1) a frequency rescaling for long contexts.

Parameter names follow Meta's checkpoints exactly, so `consolidated.00.pth` loads as is.
Shape letters (see config.py): B batch, T new tokens, S cached length, H query heads,
K kv heads, D head_dim, C dim, F FFN hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .kv_cache import CacheBatch, KVCache


class RMSNorm(nn.Module):
    # RMSNorm (Zhang & Sennrich 2019): no mean subtraction, no bias. As in Meta's code, the
    # statistics are computed in float32, the result cast back, and only then scaled.
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---- rotary position embeddings ---------------------------------------------------------

def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """theta_i = rope_theta^(-2i/D) for i < D/2 (RoFormer eq. 15), with Llama 3.1's rescaling."""
    D = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2)[: D // 2].float() / D))  # (D/2,)
    if args.use_scaled_rope:
        freqs = scale_rope_frequencies(freqs, args)
    return freqs


def scale_rope_frequencies(freqs: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    # Llama 3.1 (llama-models `apply_scaling`): keep short wavelengths (local order), stretch
    # long ones by `factor` (so positions past the training context look familiar), and blend
    # smoothly in between.
    factor, old_ctx = args.rope_scale_factor, args.rope_original_context
    low_wavelen = old_ctx / args.rope_low_freq_factor
    high_wavelen = old_ctx / args.rope_high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - args.rope_low_freq_factor) / (args.rope_high_freq_factor - args.rope_low_freq_factor)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > low_wavelen, freqs / factor, blended)
    return torch.where(wavelen < high_wavelen, freqs, out)


def precompute_rope(args: ModelArgs, n_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Meta precomputes `freqs_cis = polar(1, outer(t, freqs))` as complex64 for 2*max_seq_len
    # positions. These are its real and imaginary parts (cos, sin) for positions 0..n-1.
    return rope_angles(torch.arange(n_positions), rope_frequencies(args))


def rope_angles(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # cos and sin of position * theta_i in float32, for the positions of this call only: Meta's
    # table would cost 2 * max_seq_len * D floats twice over (33 MB for the default model with a
    # 131072-position config, more than its weights), the angles of one call a few kilobytes.
    angles = positions[..., None].float() * freqs  # (..., D/2)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Meta's interleaved layout: the pair (x[2i], x[2i+1]) is one complex number, rotated by
    # angle pos * theta_i. (HF's layout pairs x[i] with x[i + D/2]; see weights/hf.py.)
    # x: (B, T, H, D); cos, sin: (B or 1, T, D/2), the angles of each row's positions
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # (B|1, T, 1, D/2): broadcast over heads
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, T, H, D/2) each
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (B, T, H, D/2, 2)
    return out.flatten(-2).type_as(x)  # (B, T, H, D)


# ---- attention ---------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # which layer's keys and values it reads from a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: Optional[CacheBatch]):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # never v
        if cache is not None:  # store this call's keys, read every key the queries may see
            k, v = cache.update(self.layer_id, k, v)  # (B, S, K, D)
        if T == 1 and mask is not None:
            out = attend_one(q, k, v, mask)  # (B, 1, H*D)
        else:
            # softmax(q k^T / sqrt(D) + mask) v (Vaswani et al. 2017, eq. 1), the mask letting a
            # query at position p see keys at positions <= p. SDPA wants heads before positions;
            # enable_gqa lets H query heads share K kv heads without Meta's `repeat_kv` copies.
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T|S, D)
            out = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None and T > 1,
                enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D); scale 1/sqrt(D)
            out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(out)


def attend_one(q, k, v, mask):
    """Decoding: one query per row over its cached keys, the attention equation written out (SDPA's
    CPU kernels cost more than this arithmetic at one query). q (B, 1, H, D); k, v (B, S, K, D);
    mask (B, 1, 1, S). Query heads g*G..g*G+G-1 share kv head g (G = H/K, grouped-query attention,
    in the order of Meta's `repeat_kv`)."""
    B, _, H, D = q.shape
    K = k.shape[2]
    qg = q.view(B, K, H // K, D)  # (B, K, G, D): each kv head's group of query heads
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1).to(q.dtype)).float() / math.sqrt(D)  # (B, K, G, S)
    scores = scores.masked_fill(~mask.view(B, 1, 1, -1), float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)  # (B, K, G, S)
    out = torch.matmul(p, v.transpose(1, 2).to(q.dtype))  # (B, K, G, D)
    return out.reshape(B, 1, H * D)


class FeedForward(nn.Module):
    # SwiGLU (Shazeer 2020, eq. 5): w2(silu(w1 x) * w3 x). w1 = HF gate_proj, w3 = up_proj.
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        # pre-norm residual blocks (GPT-2/GPT-3 style, LLaMA paper 2.2)
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size < 1:
            raise ValueError("ModelArgs.vocab_size is -1: set it from the tokenizer (tokenizer.n_words) first")
        self.params = args
        self.vocab_size, self.n_layers = args.vocab_size, args.n_layers
        # On the meta device (weights.load_model builds shapes only, then adopts the file's
        # tensors) nn.Embedding's normal_ init would import torch._dynamo: ~1 s of start-up.
        meta = torch.empty(0).device.type == "meta"
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim,
                                           _weight=torch.empty(args.vocab_size, args.dim) if meta else None)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:  # Llama 3.2 1B/3B: one matrix for both ends
            self.output.weight = self.tok_embeddings.weight
        # theta_i, float32 whatever the weights' dtype (Meta keeps freqs_cis in complex64).
        # Non-persistent: not in the state dict.
        freqs = torch.empty(args.head_dim // 2) if meta else rope_frequencies(args)  # (D/2,)
        self.register_buffer("rope_freqs", freqs, persistent=False)
        self.cache: Optional[KVCache] = None  # the cache of Meta's forward(tokens, start_pos)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would also round the rotary frequencies: recompute them in
        # float32 after any cast.
        super()._apply(fn, recurse)
        if self.rope_freqs.dtype != torch.float32:
            self.reset_rope()
        return self

    def reset_rope(self):
        """Recompute the rotary frequencies (after building on the meta device, or changing args)."""
        self.rope_freqs = rope_frequencies(self.params).to(self.tok_embeddings.weight.device)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (..., D/2) of the rotary angles at `positions` (...)."""
        return rope_angles(positions, self.rope_freqs)

    def clear_cache(self):
        """Forget what `forward(tokens, start_pos)` cached (the memory goes with it)."""
        self.cache = None

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, cache: bool = True) -> torch.Tensor:
        """Meta's contract: float32 logits (B, T, V) for every position of `tokens` (B, T).

        start_pos: the position of tokens[:, 0]; the call attends to the keys that earlier calls
        cached for positions before it (Meta semantics: prefill, then decode one token at a time,
        or prefill in chunks). Row b of the batch is sequence b of the model's own KV cache.
        cache=False: a plain causal forward without any cache (training, scoring).
        """
        B, T = tokens.shape
        if start_pos + T > self.params.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.params.max_seq_len}")
        positions = (start_pos + torch.arange(T, device=tokens.device)).expand(B, T)  # (B, T)
        if not cache:
            if start_pos:
                raise ValueError("start_pos > 0 needs the KV cache")
            return self.step(tokens, positions)
        if start_pos == 0 or self.cache is None:
            if start_pos:
                raise RuntimeError("the KV cache was not filled for this batch: start with start_pos=0")
            rows = max(B, self.params.max_batch_size)
            weight = self.tok_embeddings.weight
            if (self.cache is None or self.cache.max_blocks < rows * self.cache.blocks_needed(self.params.max_seq_len)
                    or self.cache.dtype != weight.dtype or self.cache.device != weight.device):
                self.cache = KVCache.for_model(self, max_tokens=rows * self.params.max_seq_len)
            self.cache.reset()
        batch = self.cache.plan(range(B), [start_pos] * B, [T] * B, T)
        return self.step(tokens, positions, batch)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Optional[CacheBatch] = None,
             logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The engine's contract: tokens (B, T) at positions (B, T), reading and writing the keys
        of `cache` (a KVCache.plan of this call; None: no cache, causal over the T tokens).
        logits_at (B,): the one position per row whose logits are wanted, giving (B, V); None
        gives every position's (B, T, V). Logits are float32."""
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # (B, T, C)
        cos, sin = self.rope(positions)  # (B, T, D/2)
        mask = None if cache is None else cache.mask(positions)  # (B, 1, T, S), or None: causal
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        if logits_at is not None:  # decode needs one row of logits, not T x V of them
            h = h[torch.arange(B, device=h.device), logits_at]  # (B, C)
        return self.output(self.norm(h)).float()  # (B, [T,] V)


def set_context_length(model, max_seq_len: int) -> None:
    """Shrink the model's context to `max_seq_len` (rotary tables and KV cache follow). Never
    grows it: positions past the trained context were never seen in training."""
    if max_seq_len > model.params.max_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's trained context of "
                         f"{model.params.max_seq_len} tokens")
    model.params = dataclasses.replace(model.params, max_seq_len=max_seq_len)
    model.clear_cache()
    model.reset_rope()
