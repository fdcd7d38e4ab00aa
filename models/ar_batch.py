"""Continuous batching of AR decoding: requests join and leave one running batch per decode step.

Each request is a **row** with its own prompt, budget, temperature, seed (its own generator, so a
row draws what it would draw alone), logits processor (a grammar matcher: its own bitmask),
deadline and token callback (streaming). One loop thread owns the model:

1. admit waiting rows, at most ``max_num_seqs`` running and ``max_batch_tokens`` tokens of
   context in the batch (prompt + budget of every row);
2. feed the running rows their new tokens (one forward): the token each picked, and after it
   the text its grammar forces, if any (jump-forward decoding, padded on the right with masked
   columns to the longest row's); rows that joined are prefilled together,
   left-padded only to the longest of them, and their KV, padded on the left with masked columns to
   the batch's width, is appended to the running cache. Every row keeps its own token positions
   (0 at its first token, as alone), so the padding a row sits behind changes nothing it computes.
   A joining row longer than the batch, a batch with no rows yet, or a batch whose width has run
   ``max_padding`` columns past its longest row makes one padded prefill of every row instead (so
   the width stays bounded under constant load);
3. each row picks its next token from its own logits; a row leaves at ``<eos>``, its budget, its
   deadline, or when its caller went away (a cancelled future, or a callback that raises).

On GPUs vLLM's scheduler does this job (``backend: vllm``).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .deadline import past
from .loading import left_padded
from .temperature import is_greedy
from .verifier import (
    ARVerifier,
    Generation,
    LogitsProcessor,
    feed,
    jump_tokens,
    pick_token,
    row_positions,
)


class _Closed(Exception):
    pass


@dataclass
class _Row:
    prompt: list[int]
    budget: int
    temperature: float
    processor: LogitsProcessor | None
    generator: torch.Generator | None
    deadline: float | None
    on_token: Callable[[int], None] | None
    future: Future
    out: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)  # tokens of ``out`` not yet fed to the model
    start: float = field(default_factory=time.perf_counter)
    first_s: float = 0.0


@dataclass(frozen=True)
class BatchStats:
    steps: int  # decode forwards
    rebuilds: int  # of those, prefills of the whole batch (the first rows, a compaction, a cache that cannot grow)
    splices: int  # rows joined by a prefill of their own, appended to the running cache
    widenings: int  # of those, joins that first padded the running cache on the left (a row longer than the batch)
    tokens: int  # tokens produced
    peak_rows: int  # most rows in one step


class ARBatcher:
    """One running decode batch over an :class:`ARVerifier`'s model, fed from any thread."""

    def __init__(self, verifier: ARVerifier, max_num_seqs: int = 8, max_batch_tokens: int = 16384,
                 max_padding: int = 64):
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.verifier = verifier
        self.lm = verifier.lm
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_padding = max_padding  # positions of padding before the batch is compacted
        self._waiting: deque[_Row] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._steps = self._rebuilds = self._splices = self._widenings = self._tokens = self._peak = 0
        self._closed = False
        atexit.register(self.close)  # stop the loop between steps, not inside one, at exit

    # -- the callers' side ------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
               processor: LogitsProcessor | None = None, seed: int | None = None,
               deadline: float | None = None, on_token: Callable[[int], None] | None = None) -> Future:
        """A future of the row's :class:`Generation`; ``on_token`` (called in the loop thread) sees
        each token as it is produced; cancelling the future takes the row out at the next step."""
        if len(prompt) == 0:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        if len(prompt) + max_new_tokens > self.max_batch_tokens:
            raise ValueError(f"prompt + max_new_tokens ({len(prompt) + max_new_tokens}) exceeds the batch's "
                             f"{self.max_batch_tokens} tokens")
        gen = None
        if not is_greedy(temperature):
            gen = torch.Generator(device=self.lm.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        row = _Row(list(prompt), max_new_tokens, temperature, processor, gen, deadline, on_token, Future())
        with self._wake:
            if self._closed:
                raise RuntimeError("the AR batcher is closed")
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ar-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()
        return row.future

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **kw) -> Generation:
        """Blocking form of :meth:`submit`."""
        return self.submit(prompt, max_new_tokens, **kw).result()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the loop after its current step; rows still waiting or running fail."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)

    def stats(self) -> BatchStats:
        return BatchStats(self._steps, self._rebuilds, self._splices, self._widenings, self._tokens, self._peak)

    # -- the loop thread --------------------------------------------------------------------
    def _admit(self, active: list[_Row]) -> list[_Row]:
        """Waiting rows that join ``active`` within the limits (blocks while there is no work)."""
        joined: list[_Row] = []
        with self._wake:
            while not active and not self._waiting and not self._closed:
                self._wake.wait()
            if self._closed:
                raise _Closed()
            used = sum(len(r.prompt) + r.budget for r in active)
            while self._waiting and len(active) + len(joined) < self.max_num_seqs:
                row = self._waiting[0]
                cost = len(row.prompt) + row.budget
                if (active or joined) and used + cost > self.max_batch_tokens:
                    break
                self._waiting.popleft()
                if not row.future.cancelled():  # left pending, so a caller can still cancel it
                    joined.append(row)
                    used += cost
        return joined

    @torch.inference_mode()
    def _loop(self) -> None:
        active: list[_Row] = []
        cache = mask = logits = None
        cur = 0  # positions in the batch (padding included)
        while True:
            try:
                joined = self._admit(active)
            except _Closed:
                for r in active + list(self._waiting):
                    try:
                        r.future.set_exception(RuntimeError("the AR batcher was closed"))
                    except InvalidStateError:
                        pass
                return
            dev = self.lm.device
            try:
                # the width only grows while the batch runs (a longer joining row widens it), so
                # padding past max_padding compacts it
                step = max((len(r.new) for r in active), default=1)  # columns this step adds
                lengths = [len(r.prompt) + len(r.out) for r in active + joined]
                compact = bool(lengths) and cur + step - max(lengths) > self.max_padding
                if cache is None or not active or compact:
                    active = active + joined
                    cache, mask, logits, cur = self._rebuild(active)
                else:  # feed the running rows their new tokens, then splice the joining rows in
                    logits, mask, cur = feed(self.lm, [r.new for r in active],
                                             [len(r.prompt) + len(r.out) - len(r.new) for r in active],
                                             mask, cur, cache, self.verifier.pad_id)
                    # a joining row longer than the batch: the batch is widened by padding on the left
                    longest = max((len(r.prompt) + len(r.out) for r in joined), default=0)
                    if longest > cur and _widen_cache(cache, longest - cur):
                        pad = torch.zeros(len(active), longest - cur, dtype=mask.dtype, device=dev)
                        mask, cur = torch.cat([pad, mask], 1), longest
                        self._widenings += 1
                    if not joined:
                        spliced = logits, mask
                    elif longest > cur:  # the batch could not be widened
                        spliced = None
                    else:
                        spliced = self._splice(cache, logits, mask, joined, cur)
                    if spliced is None:  # the layers cannot be joined
                        active = active + joined
                        cache, mask, logits, cur = self._rebuild(active)
                    else:
                        (logits, mask), active = spliced, active + joined
            except BaseException as e:  # a failing forward fails the rows in it, not the loop
                for r in active + [r for r in joined if r not in active]:
                    try:
                        r.future.set_exception(e)
                    except InvalidStateError:
                        pass
                active, cache = [], None
                continue
            self._steps += 1
            self._peak = max(self._peak, len(active))
            keep: list[int] = []
            for b, row in enumerate(active):
                if self._advance(row, logits[b]):
                    keep.append(b)
            if len(keep) < len(active):
                active = [active[b] for b in keep]
                if active:
                    idx = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(idx)
                    mask = mask[idx]
                else:
                    cache = None

    def _rebuild(self, rows: list[_Row]):
        """One left-padded prefill of every row: (cache, mask, next-token logits, width)."""
        ids, mask = left_padded([r.prompt + r.out for r in rows], self.verifier.pad_id, self.lm.device)
        cache = self.lm.new_cache()
        logits = self.lm.logits(ids, mask, 0, cache, row_positions(mask))[:, -1]
        self._rebuilds += 1
        return cache, mask, logits, ids.shape[1]

    def _splice(self, cache, logits, mask, joined: list[_Row], width: int):
        """Prefill the joining rows together (left-padded to the longest of them, each at its own
        positions), pad their KV on the left to the running batch's ``width`` and append it to
        ``cache``: the batch's (logits, mask), or None when the layers cannot be joined (a cache
        layer other than the dynamic full and sliding-window ones, or a joining row longer than a
        sliding window holds)."""
        dev = self.lm.device
        ids, new_mask = left_padded([r.prompt + r.out for r in joined], self.verifier.pad_id, dev)
        new = self.lm.new_cache()
        new_logits = self.lm.logits(ids, new_mask, 0, new, row_positions(new_mask))[:, -1]
        if not _concat_caches(cache, new):
            return None
        self._splices += 1
        pad = torch.zeros(len(joined), width - new_mask.shape[1], dtype=torch.bool, device=dev)
        return torch.cat([logits, new_logits]), torch.cat([mask, torch.cat([pad, new_mask], 1)])

    def _advance(self, row: _Row, row_logits: torch.Tensor) -> bool:
        """Pick ``row``'s next token; False when the row left (its future then holds the outcome)."""
        if row.future.cancelled():
            return False
        try:
            if past(row.deadline):
                return self._finish(row, finished=False, expired=True)
            tok = pick_token(row_logits, row.out, row.processor, row.temperature, row.generator)
            if tok in self.verifier.eos_ids:
                return self._finish(row, finished=True)
            if not row.out:
                row.first_s = time.perf_counter() - row.start
            row.out.append(tok)
            row.new = [tok] + jump_tokens(row.processor, row.out, row.budget - len(row.out))
            row.out.extend(row.new[1:])
            self._tokens += len(row.new)
            if row.on_token is not None:
                for t in row.new:
                    row.on_token(t)
            if len(row.out) >= row.budget:
                return self._finish(row, finished=False)
            return True
        except BaseException as e:  # the row's own processor or consumer failed: only it leaves
            try:
                row.future.set_exception(e)
            except InvalidStateError:
                pass
            return False

    def _finish(self, row: _Row, finished: bool, expired: bool = False) -> bool:
        text = self.verifier.tokenizer.decode(row.out, skip_special_tokens=True)
        total = time.perf_counter() - row.start
        try:
            row.future.set_result(Generation(tuple(row.out), text, finished, row.first_s if row.out else total,
                                             total, expired and not finished and len(row.out) < row.budget))
        except InvalidStateError:  # cancelled meanwhile
            pass
        return False


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
