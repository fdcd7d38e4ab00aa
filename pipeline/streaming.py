"""Streaming pieces shared by every backend: UTF-8-safe text deltas, the bridge from a model loop
in a worker thread to async chunks, and stop-sequence scanning."""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Sequence

from .interfaces import TextChunk
from .watch import CanvasStep


class TextDelta:
    """Turns a growing token list into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


class Cancelled(Exception):
    """Raised inside a producer thread once its consumer went away."""


async def _iterate_in_thread(produce: Callable[[Callable[[object], None]], object]) -> AsyncIterator[object]:
    """Run ``produce(emit)`` in a thread; yield what it emits, then its return value (as a tuple
    ``("__result__", value)``). Exceptions in the thread re-raise here. When the consumer stops
    early, the next ``emit`` raises :class:`Cancelled` in the thread, which ends the model call."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    cancelled = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone
            cancelled.set()

    def emit(item) -> None:
        if cancelled.is_set():
            raise Cancelled()
        put(item)

    def run() -> None:
        try:
            put(("__result__", produce(emit)))
        except Cancelled:
            pass
        except BaseException as e:  # re-raised on the event loop side
            put(("__error__", e))
        finally:
            put(done)

    threading.Thread(target=run, daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
                raise item[1]
            yield item
    finally:
        cancelled.set()


async def text_chunks(tokenizer, pieces: AsyncIterator[list[int]], finish) -> AsyncIterator[TextChunk]:
    """Text chunks of token-id ``pieces`` (incomplete UTF-8 held back); the last chunk carries
    ``finish(ids, text)``, the closing :class:`TextResult`. A :class:`pipeline.watch.CanvasStep`
    among the pieces passes through as a chunk's ``step``."""
    delta = TextDelta(tokenizer)
    async for ids in pieces:
        if isinstance(ids, CanvasStep):
            yield TextChunk("", step=ids)
            continue
        text = delta.push(ids)
        if text:
            yield TextChunk(text)
    yield TextChunk("", finish(delta.ids, tokenizer.decode(delta.ids, skip_special_tokens=True)))


def stream_in_thread(tokenizer, produce, finish) -> AsyncIterator[TextChunk]:
    """Text chunks from a model call in a thread: ``produce(emit)`` emits token-id lists and returns
    the call's result; ``finish(result, ids)`` turns it into the closing :class:`TextResult`."""
    box: dict = {}

    async def pieces():
        async for item in _iterate_in_thread(produce):
            if isinstance(item, tuple) and item[0] == "__result__":
                box["result"] = item[1]
            else:
                yield item
        if "result" not in box:  # only after the consumer went away, so nobody reads this
            raise RuntimeError("the model call ended without a result")

    return text_chunks(tokenizer, pieces(), lambda ids, text: finish(box["result"], ids))


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop sequence; True when one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class StopScanner:
    """Streams text while holding back the tail that could still grow into a stop sequence."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        self.buffer += piece
        text, hit = cut_at_stop(self.buffer, self.stops)
        if hit:
            self.stopped, self.buffer = True, ""
            return text
        if self.hold == 0:
            out, self.buffer = self.buffer, ""
            return out
        out, self.buffer = self.buffer[: -self.hold], self.buffer[-self.hold:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
