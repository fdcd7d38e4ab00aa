"""Watching one request: the playground's trace of the pipeline's stages, as they run.

A :class:`RunWatch` is set for one request (``watching(w)``) by the playground endpoint, which
runs the request through the same :class:`pipeline.orchestrator.Pipeline` as
``/v1/chat/completions``. The stages look it up with :func:`current` and report what they saw:
the route, every denoising step's canvas, canvas commits, each validation verdict with its error
spans, the repair's kept prefix, verify rounds, stage timings. With no watch set (every other
request) :func:`current` is one context-variable read and nothing else is done or copied.

Events are ``(kind, payload)``: ``kind`` one of :data:`EVENT_KINDS`, ``payload`` JSON-ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator

# every event a watch carries, in the order a request produces them (some repeat, some are absent)
EVENT_KINDS = ("route", "stage", "step", "commit", "draft", "verdict", "repair", "rounds", "final", "error")


@dataclass(frozen=True)
class CanvasStep:
    """One denoising step of a watched draft: the step's argmax canvas, what was accepted, and each
    position's entropy; sent from the drafter as the step happens."""

    canvas: int  # canvas index within the draft
    step: int  # denoising step within the canvas
    tokens: tuple[str, ...]  # [canvas] the argmax token at each position, as text
    accepted: tuple[bool, ...]  # [canvas] accepted for the next step (pinned positions included)
    entropy: tuple[float, ...]  # [canvas] nats, rounded to 3 decimals

    def payload(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def canvas_step(tokenizer, view) -> CanvasStep:
    """A :class:`models.drafter.StepView` as the watch sends it (token texts, plain lists)."""
    ids = view.argmax.tolist()
    return CanvasStep(view.canvas_index, view.step, tuple(tokenizer.batch_decode([[i] for i in ids])),
                      tuple(bool(a) for a in view.accepted.tolist()),
                      tuple(round(float(e), 3) for e in view.entropy.tolist()))


class RunWatch:
    """The events of one watched request, in order, for one reader (the playground's SSE)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.closed = False

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 4)

    def emit(self, kind: str, **payload: Any) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown watch event {kind!r}")
        if not self.closed:  # late events (a shadow score after the answer) are dropped
            self.queue.put_nowait((kind, {"t": self.elapsed(), **payload}))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times a stage: one ``stage`` event with its start and end (seconds from the request's
        start) and whether it raised."""
        start = self.elapsed()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.emit("stage", name=name, start=start, end=self.elapsed(), ok=ok)

    def close(self) -> None:
        self.closed = True


_current: contextvars.ContextVar[RunWatch | None] = contextvars.ContextVar("dgserve_watch", default=None)


def current() -> RunWatch | None:
    """The watch of the request this task serves, or None (every unwatched request)."""
    return _current.get()


@contextlib.contextmanager
def watching(watch: RunWatch) -> Iterator[RunWatch]:
    """Sets ``watch`` for the code run inside (and the tasks it starts)."""
    token = _current.set(watch)
    try:
        yield watch
    finally:
        _current.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """:meth:`RunWatch.stage` of the current watch; nothing when there is none."""
    w = current()
    if w is None:
        yield
        return
    with w.stage(name):
        yield
