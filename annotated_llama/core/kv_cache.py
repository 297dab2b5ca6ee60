"""The key/value cache: paged memory for every layer's keys and values, and the only code that
touches it.

Why a cache: the query of token t attends to the keys and values of tokens 0..t. Recomputing
them costs a forward pass over the whole prefix per new token; keeping them costs memory,
2 * n_layers * n_kv_heads * head_dim numbers per token (Llama 3.1 8B in bfloat16: 128 KiB).

Why paged: Meta's code preallocates (max_batch_size, max_seq_len, K, D) per layer, so a model
with 131072 positions reserves gigabytes before its first token, and a finished row's memory
cannot go to another request. vLLM's PagedAttention (Kwon et al. 2023, "Efficient Memory
Management for Large Language Model Serving with PagedAttention", section 4) splits the cache
into fixed-size blocks of `block_size` token slots. Each sequence owns a list of block ids, its
block table: the token at position p lives in slot p % block_size of block table[p // block_size].
So memory follows the tokens actually held, sequences take and free blocks independently, and
a fork (n samples of one prompt) shares the prompt's blocks, copying a block only when one side
writes into a block the other still reads (copy on write). Every write to the memory, the copies
included, happens inside a forward call (`CacheBatch.update`), so tensor parallelism mirrors a
call and its cache edits together.

Here the pool itself also grows (doubling, up to `max_tokens`), so an idle long-context model
holds nothing. Block 0 is a scratch block that no sequence owns: the padding of a ragged batch
writes there and is never read by a real token.

Shapes: N blocks, P = block_size slots per block, K kv heads, D head_dim, B batch, T new tokens,
S key slots visible to a call (a multiple of P).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


class CacheFull(RuntimeError):
    """The cache has no room for what was asked (its `max_tokens` budget is spent)."""


class ContextFull(ValueError):
    """A request's prompt + max_tokens beyond the model's context (Engine.check with exact=True)."""

    def __init__(self, n_ctx: int, prompt_len: int, max_tokens: int):
        super().__init__(f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceed the context "
                         f"of {n_ctx} tokens")
        self.n_ctx, self.prompt_len, self.max_tokens = n_ctx, prompt_len, max_tokens


class KVCache:
    """Paged keys and values for `n_layers` layers: `KVCache(n_layers, n_kv_heads, head_dim,
    max_tokens=4096)`. Sequences are named by any hashable id."""

    _uids = itertools.count()  # names a cache across processes (tensor parallelism mirrors it)

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, *, max_tokens: int,
                 dtype=torch.float32, device="cpu", block_size: int = 16):
        if max_tokens < 1 or block_size < 1:
            raise ValueError(f"KVCache: max_tokens ({max_tokens}) and block_size ({block_size}) must be positive")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.dtype, self.device, self.block_size = dtype, torch.device(device), block_size
        self.uid = next(KVCache._uids)
        self.max_blocks = -(-max_tokens // block_size) + 1  # + the scratch block
        self.k: list[torch.Tensor] = []  # per layer (N, P, K, D)
        self.v: list[torch.Tensor] = []
        self.refs: list[int] = []  # how many sequences hold each block
        self.free_blocks: list[int] = []  # popped from the end: low ids first
        self.tables: dict = {}  # sequence id -> its block ids, in position order
        self.lengths: dict = {}  # sequence id -> positions written
        self._grow(1)

    @classmethod
    def for_model(cls, model, max_tokens: int, dtype=None, block_size: int = 16) -> "KVCache":
        """A cache shaped for `model`'s attention layers (under tensor parallelism: this rank's
        kv heads), in the activations' dtype unless `dtype` says otherwise."""
        att = model.layers[0].attention
        weight = model.tok_embeddings.weight
        return cls(len(model.layers), att.n_kv_heads, att.head_dim, max_tokens=max_tokens,
                   dtype=dtype or weight.dtype, device=weight.device, block_size=block_size)

    # ---- memory ----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Blocks allocated (the scratch block included)."""
        return len(self.refs)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.k[0].element_size()

    def bytes_allocated(self) -> int:
        return self.capacity * self.block_size * self.bytes_per_token

    def blocks_used(self) -> int:
        return sum(1 for r in self.refs[1:] if r > 0)

    def tokens_held(self) -> int:
        return sum(self.lengths.values())

    def blocks_needed(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def ensure_capacity(self, n_blocks: int) -> None:
        """Grow the pool to at least `n_blocks` blocks (tensor parallelism: the followers mirror
        the leader's pool size)."""
        if n_blocks > self.capacity:
            self._grow(n_blocks)

    def _grow(self, at_least: int) -> None:
        new = min(max(at_least, 2 * self.capacity), self.max_blocks)
        if new < at_least:
            raise CacheFull(f"the KV cache needs {at_least - 1} blocks of {self.block_size} tokens; its budget "
                            f"is {self.max_blocks - 1}")
        shape = (new, self.block_size, self.n_kv_heads, self.head_dim)  # (N, P, K, D)
        for store in (self.k, self.v):
            for i in range(self.n_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if len(store) > i:
                    grown[:store[i].shape[0]] = store[i]
                    store[i] = grown
                else:
                    store.append(grown)
        old = len(self.refs)
        self.refs += [0] * (new - old)
        self.free_blocks = list(range(new - 1, max(old, 1) - 1, -1)) + self.free_blocks

    def _take_block(self) -> int:
        if not self.free_blocks:
            self._grow(self.capacity + 1)
        b = self.free_blocks.pop()
        self.refs[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.refs[b] -= 1
        if self.refs[b] == 0:
            self.free_blocks.append(b)

    # ---- sequences -------------------------------------------------------------------------

    def free(self, seq_id) -> None:
        """Give back every block of `seq_id` (finished, cancelled); unknown ids are ignored."""
        for b in self.tables.pop(seq_id, []):
            self._release(b)
        self.lengths.pop(seq_id, None)

    def reset(self) -> None:
        for seq_id in list(self.tables):
            self.free(seq_id)

    def fork(self, parent, child) -> None:
        """`child` starts as a copy of `parent` (n samples of one prompt): it shares the blocks."""
        if child in self.tables:
            raise ValueError(f"KVCache.fork: sequence {child!r} exists already")
        self.tables[child] = list(self.tables[parent])
        self.lengths[child] = self.lengths[parent]
        for b in self.tables[child]:
            self.refs[b] += 1

    def truncate(self, seq_id, length: int) -> None:
        """Forget positions >= `length` (speculative decoding's rejected guesses)."""
        table = self.tables[seq_id]
        keep = self.blocks_needed(length)
        for b in table[keep:]:
            self._release(b)
        del table[keep:]
        self.lengths[seq_id] = min(self.lengths[seq_id], length)

    def _writable(self, seq_id, start: int, count: int, copies: list) -> list[int]:
        # blocks for positions [start, start + count) of seq_id, each owned by seq_id alone
        table = self.tables.setdefault(seq_id, [])
        self.lengths.setdefault(seq_id, 0)
        if start > self.lengths[seq_id]:
            raise ValueError(f"KVCache: sequence {seq_id!r} holds {self.lengths[seq_id]} positions; "
                             f"cannot write from position {start}")
        first, last = start // self.block_size, self.blocks_needed(start + count)
        while len(table) < last:
            table.append(self._take_block())
        for i in range(first, last):
            if self.refs[table[i]] > 1:  # shared with a fork: the forward call copies it before writing
                b = self._take_block()
                copies.append((table[i], b))
                self._release(table[i])
                table[i] = b
        self.lengths[seq_id] = max(self.lengths[seq_id], start + count)
        return table

    def plan(self, seq_ids: Sequence, starts: Sequence[int], counts: Sequence[int], width: int) -> "CacheBatch":
        """The cache's side of one forward call: row b writes `counts[b]` new tokens at positions
        starts[b].. (its tokens[b, :counts[b]]; the rest of the row, up to `width`, is padding)
        and reads every position before them. Allocates (or copies on write) the blocks first,
        so a CacheFull leaves the call undone."""
        P = self.block_size
        copies: list[tuple[int, int]] = []
        tables = [self._writable(s, st, n, copies) for s, st, n in zip(seq_ids, starts, counts)]
        slots = []  # (B*T,) flat slot of each new token; padding goes to the scratch block 0
        for table, st, n in zip(tables, starts, counts):
            pos = range(st, st + n)
            slots += [table[p // P] * P + p % P for p in pos] + [0] * (width - n)
        nb = max(self.blocks_needed(st + n) for st, n in zip(starts, counts))
        span = None
        if len(tables) == 1 and tables[0][:nb] == list(range(tables[0][0], tables[0][0] + nb)):
            span = tables[0][0]  # one row in consecutive blocks: read them as a view, no gather
        table = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in tables], device=self.device)  # (B, nb)
        return CacheBatch(self, torch.tensor(slots, device=self.device), table, span, nb * P,
                          fresh=all(st == 0 for st in starts),
                          copies=torch.tensor(copies, device=self.device) if copies else None)


@dataclass
class CacheBatch:
    """One forward call's view of the cache: where its new keys go and which keys it reads.
    Key slot j of row b holds that row's position j, so the one mask rule, "a query at position
    p sees keys at positions <= p", is `arange(S) <= positions[..., None]`."""
    cache: KVCache
    slots: torch.Tensor  # (B*T,) flat slot index (block * P + offset) of each new token
    block_table: torch.Tensor  # (B, nb): the blocks each row reads, padded with the scratch block
    span: Optional[int]  # first block, when one row reads consecutive blocks (a view suffices)
    key_len: int  # S = nb * P key slots per row
    fresh: bool  # every row starts at position 0: its keys are exactly the new ones
    copies: Optional[torch.Tensor] = None  # (n, 2) blocks to copy (source, destination) first: copy on write

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's k, v (B, T, K, D) for `layer`; return the keys and values its queries
        attend to: (B, T, K, D) when fresh (plain causal attention), else (B, S, K, D)."""
        B, T, K, D = k.shape
        ck, cv = self.cache.k[layer], self.cache.v[layer]  # (N, P, K, D)
        if self.copies is not None:  # a fork's shared block, about to be written: its own copy first
            for c in (ck, cv):
                c.index_copy_(0, self.copies[:, 1], c.index_select(0, self.copies[:, 0]))
        flat_k, flat_v = ck.view(-1, K, D), cv.view(-1, K, D)  # (N*P, K, D)
        flat_k.index_copy_(0, self.slots, k.reshape(B * T, K, D).to(ck.dtype))
        flat_v.index_copy_(0, self.slots, v.reshape(B * T, K, D).to(cv.dtype))
        if self.fresh:
            return k, v
        if self.span is not None:
            nb = self.block_table.shape[1]
            keys = ck[self.span:self.span + nb].view(1, self.key_len, K, D)  # (1, S, K, D): a view
            values = cv[self.span:self.span + nb].view(1, self.key_len, K, D)
            return keys, values
        rows = self.block_table.flatten()  # (B*nb,): whole blocks, copied as contiguous rows
        keys = ck.index_select(0, rows).view(B, self.key_len, K, D)  # (B*nb, P, K, D) -> (B, S, K, D)
        values = cv.index_select(0, rows).view(B, self.key_len, K, D)
        return keys, values

    def mask(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """Bool (B, 1, T, S) of the keys each query sees, or None when plain causal attention over
        the new tokens is exact (a fresh batch)."""
        if self.fresh:
            return None
        keys = torch.arange(self.key_len, device=positions.device)  # (S,)
        return (keys <= positions[..., None])[:, None]  # (B, 1, T, S)


__all__ = ["KVCache", "CacheBatch", "CacheFull"]
