"""The KV of the AR batcher's running batch (``models/ar_batch.py``), in one of two layouts.

Both answer the batcher's two questions per step: ``advance(active, joined)`` feeds each running
row its new tokens and prefills the joining rows, returning the logits after every row's last
token [active + joined, vocab]; ``keep(rows)`` drops the rows that left.

* :class:`SlotBatch` (DiffusionGemma checkpoints :func:`models.causal_encoder.lean_encoder`
  covers): each row owns a slot of a :class:`models.causal_encoder.SlotKV`, its token at position
  ``p`` in column ``p``. Joining is a prefill of the joining rows into their slots, leaving a copy
  of the slots behind it; nothing is padded, so nothing is ever prefilled again. With a
  :class:`models.prefix_cache.PrefixCache`, a joining row's prompt blocks the cache holds are
  copied into its slot, and only the rest is prefilled.
* :class:`PaddedBatch` (any transformers causal LM): transformers' ``DynamicCache``, rows padded
  on the left to a shared width. Joining rows are prefilled together at their own width and their
  KV, padded on the left, is appended to the cache (a *splice*); a joining row longer than the batch
  first pads the running cache on the left (a *widening*). A batch with no rows, or whose width has
  run ``max_padding`` columns past its longest row, makes one padded prefill of every row instead
  (a *rebuild*), which bounds the width under constant load. Every row keeps its own positions (0
  at its first token, as alone), so the padding a row sits behind changes nothing it computes.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .causal_encoder import SlotKV, lean_encoder
from .loading import left_padded
from .prefix_cache import PrefixCache
from .verifier import ARVerifier, DiffusionCausalLM, feed, row_positions


class Row(Protocol):
    prompt: list[int]
    out: list[int]  # tokens produced so far
    new: list[int]  # the tail of ``out`` not yet fed to the model


class BatchKV(Protocol):
    cached_tokens: int  # joining rows' tokens read from a prefix cache instead of prefilled
    rebuilds: int  # prefills of the whole batch
    splices: int  # prefills of joining rows added to a running batch
    widenings: int  # of those, joins that first padded the running cache on the left

    def advance(self, active: Sequence[Row], joined: Sequence[Row]) -> torch.Tensor: ...

    def keep(self, rows: Sequence[int]) -> list[int]:
        """Only the running rows ``rows`` (ascending) stay; returns them in the order the KV now
        holds them (the batch's rows from then on, in that order)."""
        ...

    def reset(self) -> None: ...


def batch_kv(verifier: ARVerifier, rows: int, layout: str = "auto", max_padding: int = 64,
             prefix_cache_tokens: int = 0) -> BatchKV:
    """``layout``: ``slots``, ``padded``, or ``auto`` (slots where the model allows it);
    ``prefix_cache_tokens``: the slot layout keeps that many tokens of prompt KV for later rows
    (``models/prefix_cache.py``; 0: none; the padded layout keeps none)."""
    if layout not in ("auto", "slots", "padded"):
        raise ValueError(f"unknown KV layout {layout!r}; expected auto, slots or padded")
    encoder = lean_encoder(verifier.lm.model) if layout != "padded" and isinstance(verifier.lm, DiffusionCausalLM) else None
    if encoder is not None:
        return SlotBatch(encoder, rows, PrefixCache(encoder, prefix_cache_tokens) if prefix_cache_tokens else None)
    if layout == "slots":
        raise ValueError("this model has no slot layout (models/causal_encoder.py:lean_encoder)")
    return PaddedBatch(verifier, max_padding)


class SlotBatch:
    """Rows in the slots of a :class:`models.causal_encoder.SlotKV`, running row ``b`` in slot ``b``."""

    def __init__(self, encoder, rows: int, prefix: PrefixCache | None = None):
        self.encoder = encoder
        self.kv = SlotKV(encoder, rows)
        self.prefix = prefix
        self.lengths: list[int] = []  # the tokens each running row has in its slot
        self.rebuilds = self.splices = self.widenings = self.cached_tokens = 0

    def advance(self, active, joined):
        parts = []
        if active:
            news = [r.new for r in active]
            parts.append(self.encoder.forward(self.kv, 0, news, self.lengths))
            self.lengths = [n + len(t) for n, t in zip(self.lengths, news)]
        if joined:
            first, seqs = len(active), [r.prompt + r.out for r in joined]
            starts = [0] * len(seqs)
            if self.prefix is not None:  # each row from the first token its cached prefix lacks
                found = [self.prefix.lookup(s) for s in seqs]
                starts = [min(len(f) * self.prefix.block, len(s) - 1) for f, s in zip(found, seqs)]
                self.kv.ensure(first + len(seqs), max(len(s) for s in seqs))
                for r, blocks in enumerate(found):
                    self.prefix.load(self.kv, first + r, blocks)
                self.cached_tokens += sum(starts)
            parts.append(self.encoder.forward(self.kv, first, [s[n:] for s, n in zip(seqs, starts)], starts))
            if self.prefix is not None:
                for r, row in enumerate(joined):
                    self.prefix.store(self.kv, first + r, row.prompt)
            self.lengths += [len(s) for s in seqs]
            if active:
                self.splices += 1
            else:
                self.rebuilds += 1
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def keep(self, rows):
        # the rows past the first len(rows) slots move into the slots the leavers free, so a row
        # that leaves costs one slot's copy, not a shift of every slot behind it
        n, staying = len(rows), set(rows)
        movers = [b for b in rows if b >= n]
        holes = [s for s in range(n) if s not in staying]
        if movers:
            self.kv.move(movers, holes, max(self.lengths))
        order = list(range(n))
        for src, dst in zip(movers, holes):
            order[dst] = src
        self.lengths = [self.lengths[b] for b in order]
        return order

    def reset(self):
        self.lengths = []


class PaddedBatch:
    """Rows left-padded in one transformers ``DynamicCache``."""

    def __init__(self, verifier: ARVerifier, max_padding: int = 64):
        self.verifier = verifier
        self.lm = verifier.lm
        self.max_padding = max_padding  # columns of padding before the batch is compacted
        self.cache = self.mask = None
        self.cur = 0  # columns in the batch (padding included)
        self.rebuilds = self.splices = self.widenings = self.cached_tokens = 0

    def advance(self, active, joined):
        step = max((len(r.new) for r in active), default=1)  # columns this step adds
        longest = max(len(r.prompt) + len(r.out) for r in [*active, *joined])
        # the width only grows while the batch runs, so padding past max_padding compacts it
        if self.cache is None or not active or self.cur + step - longest > self.max_padding:
            return self._rebuild([*active, *joined])
        logits, self.mask, self.cur = feed(self.lm, [r.new for r in active],
                                           [len(r.prompt) + len(r.out) - len(r.new) for r in active],
                                           self.mask, self.cur, self.cache, self.verifier.pad_id)
        if not joined:
            return logits
        joining = max(len(r.prompt) + len(r.out) for r in joined)
        if joining > self.cur:  # a joining row longer than the batch: widen it on the left
            if not _widen_cache(self.cache, joining - self.cur):
                return self._rebuild([*active, *joined])
            pad = torch.zeros(len(active), joining - self.cur, dtype=self.mask.dtype, device=self.mask.device)
            self.mask, self.cur = torch.cat([pad, self.mask], 1), joining
            self.widenings += 1
        spliced = self._splice(logits, joined)
        return spliced if spliced is not None else self._rebuild([*active, *joined])

    def keep(self, rows):
        if not rows:
            self.reset()
            return []
        idx = torch.tensor(list(rows), device=self.lm.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        return list(rows)

    def reset(self):
        self.cache = self.mask = None

    def _rebuild(self, rows) -> torch.Tensor:
        """One left-padded prefill of every row."""
        ids, self.mask = left_padded([r.prompt + r.out for r in rows], self.verifier.pad_id, self.lm.device)
        self.cache = self.lm.new_cache()
        self.cur = ids.shape[1]
        self.rebuilds += 1
        return self.lm.logits(ids, self.mask, 0, self.cache, row_positions(self.mask))[:, -1]

    def _splice(self, logits: torch.Tensor, joined) -> torch.Tensor | None:
        """Prefill the joining rows together (left-padded to the longest of them, each at its own
        positions), pad their KV on the left to the batch's width and append it to the cache: the
        batch's logits, or None when the layers cannot be joined (a cache layer other than the
        dynamic full and sliding-window ones, or a joining row longer than a sliding window holds)."""
        dev = self.lm.device
        ids, new_mask = left_padded([r.prompt + r.out for r in joined], self.verifier.pad_id, dev)
        new = self.lm.new_cache()
        new_logits = self.lm.logits(ids, new_mask, 0, new, row_positions(new_mask))[:, -1]
        if not _concat_caches(self.cache, new):
            return None
        self.splices += 1
        pad = torch.zeros(len(joined), self.cur - new_mask.shape[1], dtype=torch.bool, device=dev)
        self.mask = torch.cat([self.mask, torch.cat([pad, new_mask], 1)])
        return torch.cat([logits, new_logits])


def _concat_caches(cache, new) -> bool:
    """Append ``new``'s rows to ``cache`` in place, ``new``'s layers padded on the left with zero
    (masked) columns to ``cache``'s length; False, leaving ``cache`` as it was, when a layer is of
    another kind or ``new`` holds more columns than ``cache``."""
    pairs = list(zip(cache.layers, new.layers))
    if len(cache.layers) != len(new.layers):
        return False
    for a, b in pairs:
        if type(a) is not type(b) or not (_dynamic(a) and _dynamic(b)) or b.keys.shape[-2] > a.keys.shape[-2]:
            return False
        if not _kept_all(b):
            return False  # the joining rows outgrew the window: their dropped columns cannot be re-padded
    for a, b in pairs:
        a.keys, a.values = torch.cat([a.keys, _left_pad(b.keys, a.keys.shape[-2])]), \
            torch.cat([a.values, _left_pad(b.values, a.values.shape[-2])])
    return True


def _widen_cache(cache, extra: int) -> bool:
    """Pad every layer of ``cache`` on the left with ``extra`` zero (masked) columns, so that a row
    longer than the batch can join it; False, leaving ``cache`` as it was, when a layer is of
    another kind or is a sliding window that has dropped columns or would have to."""
    for layer in cache.layers:
        if not (_dynamic(layer) and _kept_all(layer)):
            return False
        if layer.is_sliding and layer.keys.shape[-2] + extra > layer.sliding_window - 1:
            return False
    for layer in cache.layers:
        n = layer.keys.shape[-2] + extra
        layer.keys, layer.values = _left_pad(layer.keys, n), _left_pad(layer.values, n)
        if layer.is_sliding:
            layer.cumulative_length = n
    return True


def _dynamic(layer) -> bool:
    """A filled dynamic cache layer, full or sliding-window: one whose columns are plain tensors."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) and layer.is_initialized


def _kept_all(layer) -> bool:
    """The layer holds every column it was fed (a sliding window that has dropped none)."""
    return not layer.is_sliding or layer.cumulative_length == layer.keys.shape[-2]


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """``x`` [batch, heads, n, dim] with zero columns in front up to ``length``."""
    if x.shape[-2] == length:
        return x
    return torch.cat([x.new_zeros(*x.shape[:-2], length - x.shape[-2], x.shape[-1]), x], dim=-2)
