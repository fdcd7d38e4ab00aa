"""The drafter's health as the router sees it, and the work a replica has in flight.

* :class:`DrafterHealth`: the ingress' circuit breaker. Drafter errors, and a replica reporting
  work stuck past its deadline, take the drafter out of rotation for a cool-down; the first request
  after it probes the drafter back.
* :class:`WorkTracker`: what a model replica is doing, with each job's deadline. Every model loop
  stops at its next step once the deadline passes (``models/deadline.py``), so work still running
  ``grace_s`` after its deadline is stuck in one step (a native call that does not return): the
  replica reports it (``/health``, the breaker) and fails Ray Serve's health check, which replaces
  the replica.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterator, Sequence

from .interfaces import Job


@dataclass
class DrafterHealth:
    """Circuit breaker: after ``max_failures`` consecutive drafter errors the drafter leaves
    rotation for ``cooldown_s``; the first request after that probes it back. ``stuck`` is the
    number of jobs the drafter replicas last reported stuck past their deadline."""

    max_failures: int = 1
    cooldown_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float = 0.0
    stuck: int = 0

    def healthy(self) -> bool:
        return self.stuck == 0 and self.clock() >= self.open_until

    def failure(self) -> None:
        self.failures += 1
        if self.failures >= self.max_failures:
            self.open_until = self.clock() + self.cooldown_s

    def success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def report_stuck(self, stuck: int) -> None:
        """A replica's :meth:`WorkTracker.status`: stuck work opens the breaker at once (and keeps
        it open while it lasts, plus a cool-down after)."""
        if stuck and not self.stuck:
            self.open_until = self.clock() + self.cooldown_s
        self.stuck = stuck


@dataclass(frozen=True)
class WorkStatus:
    in_flight: int  # jobs this replica is working on
    stuck: int  # of those, jobs still running grace_s after their deadline
    oldest_overrun_s: float  # how far past its deadline the oldest stuck job is (0 when none)


@dataclass
class WorkTracker:
    grace_s: float = 5.0
    clock: Callable[[], float] = time.time  # deadlines are time.time() values (they cross processes)
    _jobs: dict[int, float | None] = field(default_factory=dict)  # ticket -> deadline
    _tickets: Iterator[int] = field(default_factory=itertools.count)

    @contextmanager
    def track(self, deadline: float | None):
        ticket = next(self._tickets)
        self._jobs[ticket] = deadline
        try:
            yield
        finally:
            self._jobs.pop(ticket, None)

    def status(self) -> WorkStatus:
        now = self.clock()
        deadlines = tuple(self._jobs.values())  # one snapshot: worker threads add and remove jobs
        overruns = [now - d for d in deadlines if d is not None and now - d > self.grace_s]
        return WorkStatus(len(deadlines), len(overruns), round(max(overruns, default=0.0), 3))

    def check(self) -> None:
        """Raise while work is stuck (Ray Serve's ``check_health`` then replaces the replica)."""
        s = self.status()
        if s.stuck:
            raise RuntimeError(f"{s.stuck} job(s) still running {s.oldest_overrun_s:g} s past their deadline")


async def watch(status: Callable[[], Awaitable[WorkStatus]], health: DrafterHealth, period_s: float = 2.0,
                timeout_s: float = 2.0) -> None:
    """Poll a drafter replica's :class:`WorkStatus` forever, feeding :meth:`DrafterHealth.report_stuck`.
    A poll that fails or times out changes nothing: a busy replica queues it behind requests, and
    a dead one fails requests, which the breaker counts already."""
    while True:
        try:
            s = await asyncio.wait_for(status(), timeout_s)
            health.report_stuck(s.stuck)
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        await asyncio.sleep(period_s)


def tracked(work: WorkTracker, deadline: float | None, fn: Callable) -> Callable:
    """``fn`` registered with ``work`` while it runs (in its worker thread, so a call whose awaiting
    coroutine was cancelled still counts until the model loop really returns)."""

    def run(*args):
        with work.track(deadline):
            return fn(*args)

    return run


def batch_deadline(jobs: Sequence[Job]) -> float | None:
    """A batch runs until its last row's deadline at most (rows leave at their own)."""
    return None if any(j.deadline is None for j in jobs) else max(j.deadline for j in jobs)
