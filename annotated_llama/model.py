"""The LLaMA transformer, in one file.

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", section 2.2:
a decoder-only transformer with three changes to the original (Vaswani et al. 2017):
  - pre-normalization with RMSNorm (Zhang & Sennrich 2019), as in GPT-3;
  - the SwiGLU activation (Shazeer 2020), as in PaLM;
  - rotary position embeddings (Su et al. 2021), as in GPT-NeoX.
Llama 2 adds grouped-query attention (Ainslie et al. 2023) for its largest size; Llama 3 uses
GQA everywhere, rope_theta = 500000, and (3.1) a frequency rescaling for long contexts.

Parameter names follow Meta's checkpoints exactly, so `consolidated.00.pth` loads as is.
Shape letters (see config.py): B batch, T new tokens, S cached length, H query heads,
K kv heads, D head_dim, C dim, F FFN hidden, V vocab.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs


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
    # positions. We keep its real and imaginary parts (cos, sin): same numbers, no complex dtype.
    angles = torch.outer(torch.arange(n_positions).float(), rope_frequencies(args))  # (P, D/2)
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


# ---- attention with a key/value cache -----------------------------------------------------

class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.max_seq_len = args.max_seq_len
        # Meta preallocates (max_batch_size, max_seq_len, K, D) per layer at construction; we
        # allocate on first use, for the batch actually seen (OOM reports, REFERENCE section 3).
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)

    def _cache_for(self, B: int, like: torch.Tensor, fresh: bool):
        c = self.cache_k
        if c is None or c.shape[0] < B or c.dtype != like.dtype or c.device != like.device:
            if not fresh:
                raise RuntimeError("the KV cache was not filled for this batch: start with start_pos=0")
            shape = (B, self.max_seq_len, self.n_kv_heads, self.head_dim)  # (B, S_max, K, D)
            self.cache_k = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.cache_v = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.cache_k, self.cache_v

    def forward(self, x, start_pos, cos, sin, mask, use_cache: bool):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, K, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # never v

        if use_cache:
            if isinstance(start_pos, int):  # Meta's case: every row at the same slot
                cache_k, cache_v = self._cache_for(B, k, fresh=start_pos == 0)
                cache_k[:B, start_pos:start_pos + T] = k
                cache_v[:B, start_pos:start_pos + T] = v
                S = start_pos + T
            else:  # per-row slots (B,): rows of a continuous batch are at different lengths
                cache_k, cache_v = self._cache_for(B, k, fresh=False)
                slots = start_pos[:, None] + torch.arange(T, device=x.device)  # (B, T)
                rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
                cache_k[rows, slots] = k
                cache_v[rows, slots] = v
                S = mask.shape[-1]
            k, v = cache_k[:B, :S], cache_v[:B, :S]  # (B, S, K, D)

        # SDPA wants heads before positions. enable_gqa lets H query heads share K kv heads
        # without materialising Meta's `repeat_kv` copies.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T|S, D)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, D); scale 1/sqrt(D)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.wo(out)


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
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, cos, sin, mask, use_cache):
        # pre-norm residual blocks (GPT-2/GPT-3 style, LLaMA paper 2.2)
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask, use_cache)
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
        # Like Meta, room for 2 * max_seq_len positions. Non-persistent: not in the state dict.
        if meta:  # shapes only; reset_rope() computes them once the weights have a device
            cos = sin = torch.empty(args.max_seq_len * 2, args.head_dim // 2)
        else:
            cos, sin = precompute_rope(args, args.max_seq_len * 2)
        self.register_buffer("rope_cos", cos, persistent=False)  # (2*max_seq_len, D/2)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would also round the rotary tables; Meta keeps them in
        # complex64 whatever the weights' dtype. Recompute them in float32 after any cast.
        super()._apply(fn, recurse)
        if self.rope_cos.dtype != torch.float32:
            self.reset_rope()
        return self

    def reset_rope(self):
        """Recompute the rotary tables (after building on the meta device, or changing args)."""
        cos, sin = precompute_rope(self.params, self.params.max_seq_len * 2)
        device = self.tok_embeddings.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    def forward(self, tokens: torch.Tensor, start_pos=0, *, pad_left: Optional[torch.Tensor] = None,
                cache: bool = True) -> torch.Tensor:
        """Logits (float32) for every position of `tokens` (B, T).

        start_pos: the cache slot of tokens[:, 0]; the call attends to every slot before it
        that earlier calls filled (Meta semantics), so prefill-then-decode and chunked prefill
        work. It may also be a LongTensor (B,) of per-row slots, for batches whose rows have
        different lengths (continuous batching); the cache must already exist then.
        pad_left: LongTensor (B,); row b's first pad_left[b] slots are padding (ragged prompts
        left-padded to one length): its positions count from its first real token and its
        padding is never attended to.
        cache=False: a plain causal forward without the KV cache (training).
        """
        B, T = tokens.shape
        per_row = isinstance(start_pos, torch.Tensor)
        S = (int(start_pos.max()) if per_row else start_pos) + T  # keys attended: slots [0, S)
        if S > self.params.max_seq_len:
            raise ValueError(f"sequence of {S} tokens exceeds max_seq_len={self.params.max_seq_len}")
        if not cache and (per_row or start_pos != 0):
            raise ValueError("start_pos > 0 needs the KV cache")
        h = self.tok_embeddings(tokens)  # (B, T, C)
        arange_t = torch.arange(T, device=tokens.device)
        slots = start_pos[:, None] + arange_t if per_row else (start_pos + arange_t)[None]  # (B|1, T)
        positions = slots if pad_left is None else (slots - pad_left[:, None]).clamp(min=0)  # (B|1, T)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B|1, T, D/2)

        mask = None  # None: plain causal (is_causal) over slots [0, S), or one query attending to all
        if per_row or pad_left is not None or (T > 1 and start_pos > 0):
            keys = torch.arange(S, device=tokens.device)  # (S,)
            allowed = keys <= slots[..., None]  # (B|1, T, S): causal, and chunked prefill (Meta v2)
            if pad_left is not None:
                allowed = allowed & (keys >= pad_left[:, None, None])  # (B, T, S)
                # a padding query attends to itself only, so no softmax row is empty (no NaNs)
                allowed = allowed | (keys == slots[..., None])
            mask = allowed[:, None]  # (B|1, 1, T, S): broadcast over heads

        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask, cache)
        return self.output(self.norm(h)).float()  # (B, T, V)
