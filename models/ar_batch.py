"""Continuous batching of AR decoding: requests join and leave one running batch per decode step.

Each request is a **row** with its own prompt, budget, temperature, seed (its own generator, so a
row draws what it would draw alone), logits processor (a grammar matcher: its own bitmask),
deadline and token callback (streaming). One loop thread owns the model:

1. admit waiting rows, at most ``max_num_seqs`` running and ``max_batch_tokens`` tokens of
   context in the batch (prompt + budget of every row);
2. one step of the batch's KV (``models/batch_kv.py``): feed the running rows their new tokens
   (the token each picked, and after it the text its grammar forces, if any: jump-forward
   decoding) and prefill the joining rows, each at its own positions (0 at its first token, as
   alone);
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

from .batch_kv import batch_kv
from .deadline import past
from .temperature import is_greedy
from .verifier import ARVerifier, Generation, LogitsProcessor, jump_tokens, pick_token


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
    rebuilds: int  # of those, prefills of the whole batch (the first rows; padded: a compaction, a cache that cannot grow)
    splices: int  # rows joined by a prefill of their own, added to the running batch
    widenings: int  # of those, joins that first padded the running cache on the left (padded layout only)
    cached_tokens: int  # joining rows' prompt tokens read from the prefix cache, not prefilled (slots only)
    tokens: int  # tokens produced
    peak_rows: int  # most rows in one step
    row_steps: int  # rows summed over the steps (row_steps / steps: the mean batch)
    forward_s: float  # seconds in the model's forwards
    pick_s: float  # seconds in the rows' picks (masks, sampling, jump-forward, stop rules)


class ARBatcher:
    """One running decode batch over an :class:`ARVerifier`'s model, fed from any thread."""

    def __init__(self, verifier: ARVerifier, max_num_seqs: int = 8, max_batch_tokens: int = 16384,
                 kv_layout: str = "auto", max_padding: int = 64, prefix_cache_tokens: int = 0):
        """``kv_layout``, ``max_padding`` and ``prefix_cache_tokens``: :func:`models.batch_kv.batch_kv`."""
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.verifier = verifier
        self.lm = verifier.lm
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.kv = batch_kv(verifier, max_num_seqs, kv_layout, max_padding, prefix_cache_tokens)
        self._waiting: deque[_Row] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._steps = self._tokens = self._peak = self._row_steps = 0
        self._forward_s = self._pick_s = 0.0
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
        return BatchStats(self._steps, self.kv.rebuilds, self.kv.splices, self.kv.widenings, self.kv.cached_tokens,
                          self._tokens, self._peak,
                          self._row_steps, self._forward_s, self._pick_s)

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
            start = time.perf_counter()
            try:
                logits = self.kv.advance(active, joined)
            except BaseException as e:  # a failing forward fails the rows in it, not the loop
                for r in active + joined:
                    try:
                        r.future.set_exception(e)
                    except InvalidStateError:
                        pass
                active = []
                self.kv.reset()
                continue
            active = active + joined
            picked = time.perf_counter()
            self._steps += 1
            self._row_steps += len(active)
            self._peak = max(self._peak, len(active))
            keep = [b for b, row in enumerate(active) if self._advance(row, logits[b])]
            self._forward_s += picked - start
            self._pick_s += time.perf_counter() - picked
            if len(keep) < len(active):
                active = [active[b] for b in self.kv.keep(keep)]

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
