"""A fast generation path, applied to a finished model from outside (the model stays plain).

Why the plain path is slower than it needs to be (docs/annotated/10_speed.md):
  - Batch-1 decoding reads every weight once per token: it is bound by memory bandwidth, so
    it wants the fewest bytes per weight and a matrix-vector kernel that streams them. Eager
    PyTorch on this CPU has that only for float16 (`F.linear`), and float16 has no fast
    matrix-matrix kernel at all: prefill and batched decode want bfloat16. So the eager path
    keeps one weight copy per phase ("mixed": float16 decode, bfloat16 prefill).
  - Each token runs ~25 small ops per layer, each costing dispatch and a thread-pool
    fork/join. compile=True turns the batch-1 step into one torch.compile program with static
    shapes (preallocated KV cache attended through a mask, as gpt-fast does; CUDA graphs on a
    GPU), with its matrix-vector products written as multiply-and-sum, which inductor compiles
    to loops that stream float32, bfloat16 or int8 weights near the bandwidth ceiling.
  - Prefill and batched decode run eagerly on bfloat16 weights prepacked for oneDNN.
  - Prefill computes logits for the last position only (the plain forward returns all of
    them: T x C x V extra FLOPs).

Ragged batches are left-padded, as in model.forward(pad_left=...).
Shape letters: B batch, T new tokens, L cache length, H heads, K kv heads, G = H/K, D head_dim,
C dim, N output features, V vocab.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .model import Transformer
from .sampling import sample

MODES = ("float32", "mixed", "bfloat16", "float16", "int8", "int4")


def _fuse(linears: Sequence[nn.Module], dtype: torch.dtype):
    """One weight for several Linears that read the same input: concatenate output rows."""
    from .quantize import Int4Linear, Int8Linear
    first = linears[0]
    if all(isinstance(l, Int8Linear) for l in linears):
        m = Int8Linear(first.in_features, sum(l.out_features for l in linears), device=first.weight.device)
        m.weight.copy_(torch.cat([l.weight for l in linears]))
        m.scales.copy_(torch.cat([l.scales for l in linears]))
        return m
    if all(isinstance(l, Int4Linear) for l in linears):
        from .quantize import unpack_nibbles
        m = Int4Linear(first.in_features, sum(l.out_features for l in linears), first.group_size,
                       device=first.packed.device)
        m.set_quantized(torch.cat([unpack_nibbles(l.nibbles) for l in linears]),
                        torch.cat([l.group_scales for l in linears]), torch.cat([l.group_mins for l in linears]))
        return m
    if isinstance(first, nn.Linear):
        return torch.cat([l.weight.detach() for l in linears]).to(dtype).contiguous()  # (sum N, C)
    return nn.ModuleList(linears)  # mixed int4/int8: no fusion; _apply_linear runs each


class _Weights:
    """One phase's weights: fused q|k|v and w1|w3, in that phase's dtype (or quantized).
    pack=True stores the float matrices in oneDNN's blocked layout (as inductor's "freezing"
    does): bf16 products run ~2x faster than F.linear's at 1 to 512 rows here. Such opaque
    tensors cannot enter a torch.compile graph: the compiled batch-1 step keeps a plain copy."""

    def __init__(self, model: Transformer, dtype: torch.dtype, pack: bool = False):
        self.dtype, self.packed = dtype, pack
        self.layers = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            self.layers.append(dict(  # norm weights in the activations' dtype: no cast per step
                attn_norm=layer.attention_norm.weight.detach().to(dtype),
                wqkv=_fuse([a.wq, a.wk, a.wv], dtype), wo=_fuse([a.wo], dtype),
                ffn_norm=layer.ffn_norm.weight.detach().to(dtype),
                w13=_fuse([f.w1, f.w3], dtype), w2=_fuse([f.w2], dtype)))
        self.norm = model.norm.weight.detach().to(dtype)
        self.output = _fuse([model.output], dtype)
        if pack:
            for lw in self.layers:
                for k in ("wqkv", "wo", "w13", "w2"):
                    lw[k] = torch.ops.mkldnn._reorder_linear_weight(lw[k], 8)
            self.output = torch.ops.mkldnn._reorder_linear_weight(self.output, 8)


def _reduce_matvec(x, w):
    """One row times a weight, written as multiply-and-sum for torch.compile.

    Inductor turns this into one loop that streams the weight once, converts it to float32 in
    registers and accumulates: a bandwidth-bound matrix-vector product for float32 and 16-bit
    weights (eager would materialise the (N, K) product, so compile only). For int8 the same
    loop is bound by the int8 -> float32 conversions instead (no int8 dot-product instructions)."""
    from .quantize import Int8Linear
    xf = x.reshape(-1, x.shape[-1]).float()[None]  # (1, B, K)
    # B is 1 on the compiled decode path: with more rows inductor's loops were ~50x slower
    # (batches use oneDNN instead), but the shapes stay general for eager checks
    if isinstance(w, torch.Tensor):
        y = (w.float()[:, None] * xf).sum(-1)  # (N, B)
    elif isinstance(w, Int8Linear):
        y = (w.weight.float()[:, None] * xf).sum(-1) * w.scales.float()[:, None]  # (N, B)
    elif isinstance(w, nn.ModuleList):  # unfused layers of different kinds
        return torch.cat([_reduce_matvec(x, m) for m in w], dim=-1)
    else:
        # any other module runs itself: Int4Linear's packed kernel reads half a byte per weight
        # (written out as multiply-and-sum, the nibble unpacking made inductor's loop ~10x slower)
        return w(x)
    return y.t().to(x.dtype).reshape(*x.shape[:-1], -1)  # (..., N)


def _apply_linear(x, w, mv: str = "linear"):
    """x @ w.T for a float weight (plain, or prepacked for oneDNN), a quantized module
    (quantize.Int8Linear / Int4Linear) or an unfused list of them."""
    if mv == "reduce":
        return _reduce_matvec(x, w)
    if not isinstance(w, torch.Tensor):
        return torch.cat([m(x) for m in w], dim=-1) if isinstance(w, nn.ModuleList) else w(x)
    if w.is_mkldnn:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, None, "none", [], "")
        return y.view(*x.shape[:-1], -1)  # (..., N)
    if mv == "mv":  # one row: BLAS's matrix-vector routine (gemv)
        return torch.mv(w, x.reshape(-1)).view(*x.shape[:-1], w.shape[0])
    return F.linear(x, w)


def _rms_norm(x, weight, eps):
    # Meta's order: normalise in float32, cast back, then scale (REFERENCE b1); the weight is
    # already in x's dtype (_Weights)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _rope(x, cos, sin):
    # x: (B, T, N, D) with Meta's interleaved pairs; cos, sin: (B|1, T, D/2)
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, N, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None], sin[:, :, None]  # (B|1, T, 1, D/2)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).to(x.dtype)  # (B, T, N, D)


def _attend_one(q, ck, cv, mask, compiled: bool):
    """Attention of one new query per row over all L cache slots, written out (SDPA's CPU
    kernel costs ~0.15 ms a call at batch 1 and ~1 ms at batch 8 for this one-query shape).
    q (B, H, 1, D); ck, cv (B, K, L, D); mask (B, 1, 1, L) bool. Query heads h*G..h*G+G-1
    share kv head h (G = H/K), as Meta's repeat_kv arranges them."""
    B, H, _, D = q.shape
    K, L = ck.shape[1], ck.shape[2]
    qg = q.view(B, K, H // K, D)  # (B, K, G, D): each kv head's query group
    if compiled:  # multiply-and-sum: inductor fuses it into a few loops
        scores = (qg.float()[:, :, :, None] * ck.float()[:, :, None]).sum(-1)  # (B, K, G, L)
    else:
        scores = torch.matmul(qg, ck.transpose(-1, -2)).float()  # (B, K, G, L)
    scores = scores.masked_fill(~mask.view(B, 1, 1, L), float("-inf")) / math.sqrt(D)
    p = torch.softmax(scores, dim=-1)  # (B, K, G, L)
    if compiled:
        o = (p[..., None] * cv.float()[:, :, None]).sum(-2)  # (B, K, G, D)
    else:
        o = torch.matmul(p.to(cv.dtype), cv)  # (B, K, G, D)
    return o.reshape(B, H, 1, D).to(q.dtype)


class FastDecoder:
    """Greedy or sampled generation with per-phase weight dtypes and a static KV cache.

    FastDecoder(model, mode="mixed").generate([[1, 5, 9]], max_new_tokens=32) -> [[...32 ids]]
    mode: "float32"; "mixed" (CPU default: float16 for batch-1 decode, bfloat16 for prefill
    and batched decode; compiled, it is "bfloat16"); "bfloat16"; "float16"; "int8"/"int4"
    (weight-only, bf16 activations).
    compile=True compiles the batch-1 decode step with torch.compile (~1 minute on a 2-core
    CPU for a 134M model, cached on disk; CUDA graphs on CUDA). matvec: how batch-1 decode
    multiplies, "reduce" (multiply-and-sum, the default when compiled), "linear" (F.linear,
    the default eager) or "mv" (torch.mv, BLAS gemv).
    """

    def __init__(self, model: Transformer, mode: Optional[str] = None, *, compile: bool = False,
                 group_size: int = 128, matvec: Optional[str] = None):
        device = model.tok_embeddings.weight.device
        mode = mode or ("mixed" if device.type == "cpu" else "bfloat16")
        if mode not in MODES:
            raise ValueError(f"FastDecoder mode must be one of {MODES}, got {mode!r}")
        if matvec is None:  # multiply-and-sum only pays once compiled (eager would materialise it)
            # CUDA: cuBLAS serves float weights, but int8 through F.linear first writes a bf16 copy
            # of each weight; multiply-and-sum compiles to one Triton kernel reading the int8 bytes
            matvec = "reduce" if compile and (device.type == "cpu" or mode == "int8") else "linear"
        if matvec not in ("linear", "mv", "reduce"):
            raise ValueError(f"matvec must be 'linear', 'mv' or 'reduce', got {matvec!r}")
        self.mode, self.device, self.args, self.matvec = mode, device, model.params, matvec
        self.eps = model.params.norm_eps
        self.H, self.K, self.D = model.params.n_heads, model.params.n_kv_heads, model.params.head_dim
        if mode in ("int8", "int4"):
            from .quantize import quantize_model
            if getattr(model, "quantization", None) is None:
                model = quantize_model(copy.deepcopy(model), mode, group_size=group_size)
            prefill = decode = _Weights(model, torch.bfloat16)
            cache_dtype = torch.bfloat16
        else:
            if compile and device.type == "cpu" and mode == "mixed":
                mode = self.mode = "bfloat16"  # compiled, batch-1 bfloat16 streams as fast as float16
            p_dtype = {"float32": torch.float32, "float16": torch.float16}.get(mode, torch.bfloat16)
            d_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(mode, torch.float16)
            pack = device.type == "cpu" and p_dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            prefill = _Weights(model, p_dtype, pack=pack)
            if d_dtype == p_dtype and not (compile and pack):
                decode = prefill
            else:
                decode = _Weights(model, d_dtype)
            cache_dtype = d_dtype
        self.prefill_w, self.decode_w, self.cache_dtype = prefill, decode, cache_dtype
        # the embedding table is read one row per token: keep it as is (float32)
        self.embed = model.tok_embeddings.weight.detach()
        self.rope_cos, self.rope_sin = model.rope_cos, model.rope_sin
        self.cache_k = self.cache_v = None
        self.stats = {}
        self.compiled = compile
        self._step = None  # the compiled step, built at the first decode step

    def _compiled_step(self):
        """The decode step through torch.compile, built at the first decode step (importing
        torch._dynamo alone takes ~1 s: the first token should not wait for it)."""
        if self._step is None:
            for t in [*self._tensors(), *self.cache_k, *self.cache_v]:
                # weights reached through plain objects would otherwise be graph inputs that
                # CUDA graphs copy into static buffers on every call
                torch._dynamo.mark_static_address(t)
            if self.device.type == "cuda":
                kw = {"mode": "reduce-overhead"}  # CUDA graphs: one launch per step
            else:
                # store every intermediate vector: inductor would otherwise inline each RMSNorm
                # (and the residual adds) into the matrix-vector loop, redone per row (~25% slower)
                kw = {"options": {"realize_opcount_threshold": 1, "realize_acc_reads_threshold": 1}}
            self._step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, **kw)
        return self._step

    def _tensors(self):
        yield from (self.embed, self.rope_cos, self.rope_sin)
        for w in {id(self.prefill_w): self.prefill_w, id(self.decode_w): self.decode_w}.values():
            for item in [w.norm, w.output] + [v for lw in w.layers for v in lw.values()]:
                if isinstance(item, torch.Tensor):
                    if not item.is_mkldnn:
                        yield item
                else:
                    yield from item.buffers()

    # ---- the two phases ----------------------------------------------------------------

    def reset(self, B: int, L: int):
        # one (B, K, L, D) tensor per layer, heads first for SDPA; separate tensors (not one
        # stacked cache) so a compiled step writes its one slot in place instead of copying a
        # whole layer's view in and out
        shape = (B, self.K, L, self.D)
        if self.cache_k is None or self.cache_k[0].shape != shape:
            self.cache_k = [torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
                            for _ in range(self.args.n_layers)]
            self.cache_v = [torch.zeros_like(c) for c in self.cache_k]
            if self._step is not None:  # already compiled: new caches are static too
                for c in self.cache_k + self.cache_v:
                    torch._dynamo.mark_static_address(c)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, pad_left: Optional[torch.Tensor] = None,
                weights: Optional[_Weights] = None) -> torch.Tensor:
        """Run the prompt (B, T) from slot 0, fill the cache; float32 logits (B, V) of the last position."""
        w = weights or self.prefill_w
        B, T = tokens.shape
        x = self.embed[tokens].to(w.dtype)  # (B, T, C)
        positions = torch.arange(T, device=self.device)[None]  # (1, T)
        mask = None
        if pad_left is not None:
            positions = (positions - pad_left[:, None]).clamp(min=0)  # (B, T)
            keys = torch.arange(T, device=self.device)
            allowed = (keys <= keys[:, None]) & (keys >= pad_left[:, None, None])  # (B, T, T)
            mask = (allowed | (keys == keys[:, None]))[:, None]  # (B, 1, T, T); pads see themselves
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (B|1, T, D/2)
        for i, lw in enumerate(w.layers):
            h = _rms_norm(x, lw["attn_norm"], self.eps)
            q, k, v = self._qkv(h, lw, cos, sin)  # (B, H|K, T, D)
            self.cache_k[i][:, :, :T] = k.to(self.cache_dtype)
            self.cache_v[i][:, :, :T] = v.to(self.cache_dtype)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.K != self.H)  # (B, H, T, D)
            x = x + _apply_linear(o.transpose(1, 2).reshape(B, T, self.H * self.D), lw["wo"])
            x = x + self._ffn(_rms_norm(x, lw["ffn_norm"], self.eps), lw)
        x = _rms_norm(x[:, -1], w.norm, self.eps)  # (B, C): only the last position's logits
        return _apply_linear(x, w.output).float()  # (B, V)

    def _qkv(self, h, lw, cos, sin, mv="linear"):
        B, T, _ = h.shape
        H, K, D = self.H, self.K, self.D
        qkv = _apply_linear(h, lw["wqkv"], mv).view(B, T, H + 2 * K, D)  # (B, T, H+2K, D)
        qk = _rope(qkv[:, :, : H + K], cos, sin)  # q and k rotated together, never v
        q, k = qk[:, :, :H], qk[:, :, H:]
        v = qkv[:, :, H + K:]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K|K, T, D)

    def _ffn(self, h, lw, mv="linear"):
        # SwiGLU with w1 and w3 in one matmul: (B, T, 2F) -> two (B, T, F) halves
        a, b = _apply_linear(h, lw["w13"], mv).chunk(2, dim=-1)
        return _apply_linear(F.silu(a) * b, lw["w2"], mv)

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor, pad_left: torch.Tensor,
                     w: _Weights) -> torch.Tensor:
        """One token per row. token (B, 1); pos: 0-d slot index shared by all rows; pad_left (B,).
        Static shapes throughout (attention reads all L slots through a mask), so the step
        compiles once and never syncs with the host."""
        B = token.shape[0]
        L = self.cache_k[0].shape[2]
        mv = self.matvec if B == 1 and not w.packed else "linear"
        x = self.embed[token].to(w.dtype)  # (B, 1, C)
        rope_pos = (pos - pad_left)[:, None]  # (B, 1): each row counts from its first real token
        cos, sin = self.rope_cos[rope_pos], self.rope_sin[rope_pos]  # (B, 1, D/2)
        keys = torch.arange(L, device=token.device)
        mask = ((keys <= pos) & (keys >= pad_left[:, None]))[:, None, None]  # (B, 1, 1, L)
        for i, lw in enumerate(w.layers):
            h = _rms_norm(x, lw["attn_norm"], self.eps)
            q, k, v = self._qkv(h, lw, cos, sin, mv)  # (B, H|K, 1, D)
            ck, cv = self.cache_k[i], self.cache_v[i]  # (B, K, L, D)
            ck.index_copy_(2, pos.view(1), k.to(self.cache_dtype))
            cv.index_copy_(2, pos.view(1), v.to(self.cache_dtype))
            o = _attend_one(q.to(self.cache_dtype), ck, cv, mask, compiled=mv == "reduce")  # (B, H, 1, D)
            x = x + _apply_linear(o.to(w.dtype).reshape(B, 1, self.H * self.D), lw["wo"], mv)
            x = x + self._ffn(_rms_norm(x, lw["ffn_norm"], self.eps), lw, mv)
        x = _rms_norm(x[:, 0], w.norm, self.eps)  # (B, C)
        return _apply_linear(x, w.output, mv).float()  # (B, V)

    def decode_weights(self, B: int) -> _Weights:
        # float16 matrix-vector is the fast batch-1 path; more rows need bfloat16 (MACHINE.md)
        return self.decode_w if B == 1 or self.device.type != "cpu" else self.prefill_w

    # ---- generation --------------------------------------------------------------------

    def generate(self, prompt_tokens: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: float = 1.0,
                 stop_ids: Sequence[int] = (), seed: Optional[int] = None) -> list[list[int]]:
        """New tokens for each prompt (stop ids included, nothing after them).
        temperature=0 is greedy. Ragged prompts are left-padded; each row gives what it
        would alone (up to float rounding)."""
        out = list(self._run(prompt_tokens, max_new_tokens, temperature, top_k, top_p, stop_ids, seed))
        rows = torch.stack(out, 1).tolist()  # (B, N)
        stops = set(stop_ids)
        return [r[: next((j + 1 for j, t in enumerate(r) if t in stops), len(r))] for r in rows]

    def stream(self, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
               top_k: Optional[int] = None, top_p: float = 1.0, stop_ids: Sequence[int] = (),
               seed: Optional[int] = None) -> Iterator[int]:
        """One prompt's new token ids as they are sampled (a stop id is yielded, then it ends)."""
        stops = set(stop_ids)
        for nxt in self._run([prompt], max_new_tokens, temperature, top_k, top_p, stop_ids, seed):
            token = int(nxt[0])  # a host sync per token: the price of streaming
            yield token
            if token in stops:
                return

    @torch.no_grad()
    def _run(self, prompt_tokens, max_new_tokens, temperature, top_k, top_p, stop_ids, seed):
        """Yields the (B,) token tensor of each step; sets self.stats when it runs to its end."""
        if not prompt_tokens or any(len(p) == 0 for p in prompt_tokens):
            raise ValueError("prompt_tokens: every prompt needs at least one token")
        B, T = len(prompt_tokens), max(len(p) for p in prompt_tokens)
        if T + max_new_tokens > self.args.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len={self.args.max_seq_len}")
        L = min(self.args.max_seq_len, -(-(T + max_new_tokens) // 128) * 128)  # round up: fewer recompiles
        self.reset(B, L)
        tokens = torch.zeros(B, T, dtype=torch.long)
        pad = torch.tensor([T - len(p) for p in prompt_tokens])
        for b, p in enumerate(prompt_tokens):
            tokens[b, T - len(p):] = torch.tensor(p)
        tokens, pad = tokens.to(self.device), pad.to(self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else torch.initial_seed())
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=self.device)

        t0 = time.perf_counter()
        logits = self.prefill(tokens, pad if bool(pad.any()) else None)
        nxt = sample(logits, temperature, top_p, top_k, generator=gen)  # (B,)
        done = torch.isin(nxt, stop)
        first_token_s = time.perf_counter() - t0
        n = 1
        yield nxt
        w = self.decode_weights(B)
        # oneDNN-packed weights cannot enter a compiled graph: those batches run eagerly
        step = self._compiled_step() if self.compiled and not w.packed else self.decode_step
        pos = torch.tensor(T, device=self.device)  # stays on the device: no copy per step
        for _ in range(max_new_tokens - 1):
            if stop_ids and bool(done.all()):  # the one host sync per token, only with stop ids
                break
            logits = step(nxt[:, None], pos, pad, w)
            nxt = sample(logits, temperature, top_p, top_k, generator=gen)
            n += 1
            yield nxt
            pos = pos + 1
            if stop_ids:
                done |= torch.isin(nxt, stop)
        total = time.perf_counter() - t0
        self.stats = {"prefill_s": first_token_s, "decode_s": total - first_token_s,
                      "prompt_tokens": B * T, "decode_tokens": B * (n - 1)}


def prepare_fast(model: Transformer, mode: Optional[str] = None, *, compile: bool = False) -> FastDecoder:
    """Build a FastDecoder for `model` (the model itself is left untouched and still usable)."""
    return FastDecoder(model.eval(), mode, compile=compile)
