"""Prompt KV kept for the next row that starts with the same tokens (automatic prefix caching, as
vLLM does it, on the slot layout of ``models/causal_encoder.py``).

A prompt is cut into blocks of ``block`` tokens. A full block's KV is kept in a pool under its
tokens and the block before it, so a lookup walks a new prompt block by block and stops at the
first block it has not seen: two prompts share cached blocks exactly as far as their tokens agree
from the start, and never by a hash that two different prefixes could share. A row that joins the
batch copies the cached blocks into its slot and is prefilled from there on; its own full prompt
blocks are kept after its prefill. When the pool is full the least recently used block goes;
a lookup touches a prompt's deeper blocks before its shallower ones, so a prefix outlives the
blocks that extend it.

Example (``block`` 4): after ``[5, 6, 7, 8, 9, 10, 11, 12, 13]`` is prefilled, its two full blocks
are kept; ``[5, 6, 7, 8, 9, 10, 11, 12, 40]`` then finds 8 tokens and is prefilled from position 8
(one token), ``[5, 6, 7, 8, 1, ...]`` finds 4, and ``[6, 5, ...]`` none. At least one token of a
prompt is always prefilled, since the row needs the logits after it.

Each position's KV depends only on the tokens up to it, so a row reads what its own prefill would
have written (to the last bits of float arithmetic: the prefill that wrote it may have had another
batch shape).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class _Block:
    uid: int  # never reused: a block kept under an evicted parent can never be found again
    index: int  # its place in the pool


class PrefixCache:
    """``capacity_tokens`` tokens of KV (rounded down to whole blocks) for ``encoder``'s layers;
    the pool grows as blocks come, doubling, up to that."""

    def __init__(self, encoder, capacity_tokens: int = 8192, block: int = 16):
        if block < 1 or capacity_tokens < block:
            raise ValueError(f"a prefix cache needs at least one block of {block} tokens, not {capacity_tokens}")
        self.block = block
        self.capacity = capacity_tokens // block  # blocks
        self._encoder = encoder
        self.keys: list[torch.Tensor] = []  # per layer [blocks, kv_heads, block, head_dim], as SlotKV keeps a slot's columns
        self.values: list[torch.Tensor] = []
        self._blocks: OrderedDict[tuple[int, tuple[int, ...]], _Block] = OrderedDict()  # LRU first
        self._free: list[int] = []
        self._uids = itertools.count(1)  # 0: the root, before a prompt's first block

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def allocated(self) -> int:
        """Blocks the pool has room for now."""
        return self.keys[0].shape[0] if self.keys else 0

    def _grow(self, blocks: int) -> None:
        e, had = self._encoder, self.allocated
        new_k = [e.embed.new_zeros(blocks, L.kv_heads, self.block, L.head_dim) for L in e.layers]
        new_v = [e.embed.new_zeros(blocks, L.kv_heads, self.block, L.head_dim) for L in e.layers]
        for new, old in zip(new_k + new_v, self.keys + self.values):
            new[:had] = old
        self.keys, self.values = new_k, new_v
        self._free.extend(range(blocks - 1, had - 1, -1))  # taken from the end: the lowest first

    def lookup(self, tokens: Sequence[int]) -> list[_Block]:
        """The cached blocks ``tokens`` starts with, in order (touched as used)."""
        found, keys, parent = [], [], 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            b = self._blocks.get(key)
            if b is None:
                break
            found.append(b)
            keys.append(key)
            parent = b.uid
        self._touch(keys)
        return found

    @torch.inference_mode()
    def load(self, kv, slot: int, blocks: Sequence[_Block]) -> None:
        """Copy ``blocks`` into columns ``0..len(blocks) * block - 1`` of ``kv``'s slot ``slot``
        (``kv`` a :class:`models.causal_encoder.SlotKV` with room for them)."""
        if not blocks:
            return
        idx = torch.tensor([b.index for b in blocks], device=self.keys[0].device)
        n = len(blocks) * self.block
        for pool, slots in zip(self.keys + self.values, kv.keys + kv.values):
            got = pool[idx]  # [blocks, kv_heads, block, d]
            slots[slot, :, :n] = got.transpose(0, 1).reshape(got.shape[1], n, got.shape[3])

    @torch.inference_mode()
    def store(self, kv, slot: int, tokens: Sequence[int]) -> None:
        """Keep the full blocks of ``tokens`` whose KV ``kv``'s slot ``slot`` holds and the cache
        does not (a row's prompt, after its prefill)."""
        keys, parent = [], 0
        for start in range(0, len(tokens) - self.block + 1, self.block):
            key = (parent, tuple(tokens[start:start + self.block]))
            b = self._blocks.get(key)
            if b is None:
                b = self._blocks[key] = _Block(next(self._uids), self._take())
                for pool, slots in zip(self.keys + self.values, kv.keys + kv.values):
                    pool[b.index] = slots[slot, :, start:start + self.block]
            keys.append(key)
            parent = b.uid
        self._touch(keys)

    def _touch(self, keys) -> None:
        """Most recently used: ``keys`` (one prompt's blocks in order), the deeper ones first, so
        that a prefix is more recent than the blocks that extend it."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _take(self) -> int:
        if not self._free and self.allocated < self.capacity:
            self._grow(min(self.capacity, max(16, 2 * self.allocated)))
        if self._free:
            return self._free.pop()
        _, old = self._blocks.popitem(last=False)  # the least recently used block
        return old.index
