"""Continuous batching of AR decoding: requests join and leave one running batch per decode step.

Each request is a **row** with its own prompt, budget, temperature, seed (its own generator, so a
row draws what it would draw alone), logits processor (a grammar matcher: its own bitmask),
deadline and token callback (streaming). One loop thread owns the model:

1. admit waiting rows, at most ``max_num_seqs`` running and ``max_batch_tokens`` tokens of
   context in the batch (prompt + budget of every row);
2. if rows joined, rebuild the batch: ONE left-padded prefill over every running row's prompt and
   the tokens it has so far (rows at different lengths line up by padding, as in
   :meth:`models.verifier.ARVerifier.generate`); else feed each row's last token (one forward);
3. each row picks its next token from its own logits; a row leaves at ``<eos>``, its budget, its
   deadline, or when its caller went away (a cancelled future, or a callback that raises).

Why a rebuild instead of splicing a new row's KV into the running cache: the running cache mixes
full and sliding-window layers whose lengths differ, and on the CPU a prefill of the small batch
costs about one decode step (the forward is overhead-bound, not FLOP-bound), so joining costs one
step and stays exact. On GPUs vLLM's scheduler does this job (``backend: vllm``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .deadline import past
from .loading import left_padded
from .verifier import MIN_TEMPERATURE, ARVerifier, Generation, LogitsProcessor


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
    start: float = field(default_factory=time.perf_counter)
    first_s: float = 0.0


@dataclass(frozen=True)
class BatchStats:
    steps: int  # decode forwards
    rebuilds: int  # of those, prefills of the whole batch because rows joined
    tokens: int  # tokens produced
    peak_rows: int  # most rows in one step


class ARBatcher:
    """One running decode batch over an :class:`ARVerifier`'s model, fed from any thread."""

    def __init__(self, verifier: ARVerifier, max_num_seqs: int = 8, max_batch_tokens: int = 16384):
        if max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        self.verifier = verifier
        self.lm = verifier.lm
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self._waiting: deque[_Row] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._steps = self._rebuilds = self._tokens = self._peak = 0

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
        if temperature >= MIN_TEMPERATURE:
            gen = torch.Generator(device=self.lm.device)
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        row = _Row(list(prompt), max_new_tokens, temperature, processor, gen, deadline, on_token, Future())
        with self._wake:
            self._waiting.append(row)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="ar-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()
        return row.future

    def generate(self, prompt: Sequence[int], max_new_tokens: int, **kw) -> Generation:
        """Blocking form of :meth:`submit`."""
        return self.submit(prompt, max_new_tokens, **kw).result()

    def stats(self) -> BatchStats:
        return BatchStats(self._steps, self._rebuilds, self._tokens, self._peak)

    # -- the loop thread --------------------------------------------------------------------
    def _admit(self, active: list[_Row]) -> bool:
        """Move waiting rows into ``active`` within the limits; True when any joined."""
        joined = False
        with self._wake:
            while not active and not self._waiting:
                self._wake.wait()
            used = sum(len(r.prompt) + r.budget for r in active)
            while self._waiting and len(active) < self.max_num_seqs:
                row = self._waiting[0]
                cost = len(row.prompt) + row.budget
                if active and used + cost > self.max_batch_tokens:
                    break
                self._waiting.popleft()
                if not row.future.cancelled():  # left pending, so a caller can still cancel it
                    active.append(row)
                    used += cost
                    joined = True
        return joined

    @torch.inference_mode()
    def _loop(self) -> None:
        active: list[_Row] = []
        cache = mask = logits = None
        cur = 0
        while True:
            joined = self._admit(active)
            dev = self.lm.device
            try:
                if joined or cache is None:
                    ids, mask = left_padded([r.prompt + r.out for r in active], self.verifier.pad_id, dev)
                    cache = self.lm.new_cache()
                    logits = self.lm.logits(ids, mask, 0, cache)[:, -1]
                    cur = ids.shape[1]
                    self._rebuilds += 1
                else:
                    step_ids = torch.tensor([[r.out[-1]] for r in active], device=dev)
                    mask = torch.cat([mask, torch.ones(len(active), 1, dtype=torch.bool, device=dev)], 1)
                    logits = self.lm.logits(step_ids, mask, cur, cache)[:, -1]
                    cur += 1
            except BaseException as e:  # a failing forward fails the rows in it, not the loop
                for r in active:
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

    def _advance(self, row: _Row, row_logits: torch.Tensor) -> bool:
        """Pick ``row``'s next token; False when the row left (its future then holds the outcome)."""
        if row.future.cancelled():
            return False
        try:
            if past(row.deadline):
                return self._finish(row, finished=False, expired=True)
            if row.processor is not None:
                row_logits = row.processor(row.out, row_logits)
            if row.generator is not None:
                probs = torch.softmax(row_logits.float() / row.temperature, dim=-1)
                tok = int(torch.multinomial(probs, 1, generator=row.generator))
            else:
                tok = int(row_logits.argmax())
            if tok in self.verifier.eos_ids:
                return self._finish(row, finished=True)
            if not row.out:
                row.first_s = time.perf_counter() - row.start
            row.out.append(tok)
            self._tokens += 1
            if row.on_token is not None:
                row.on_token(tok)
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
