"""What the orchestration talks to: jobs, results and the backend Protocols.

Vocabulary (see ``kernels/sampler.py`` for canvas, step, accept, renoise, commit):

* **draft**: the drafter's (DiffusionGemma's) answer, produced canvas by canvas;
* **verify**: one AR forward over ``prompt + draft``; the **accepted prefix** is the longest prefix
  of the draft equal to AR's greedy choices, the **correction token** is AR's token right after it;
* **repair**: AR continues under the constraint from the longest draft prefix the constraint still
  accepts; **fallback**: AR answers from scratch under the constraint;
* **constraint**: what a structured answer must satisfy (JSON Schema, JSON object, regex, ...).

Backends are async Protocols so the same orchestration runs in-process (tests, benchmarks) or over
Ray Serve handles (``deployments/``), which implement them with the same signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from models.constraints import (
    ConstraintKind as ConstraintKind,  # the closed set, with the models that compile it
)


@dataclass(frozen=True)
class Constraint:
    kind: ConstraintKind | str  # a ConstraintKind, or the name a custom validator registered
    spec: Any = None  # the schema dict, the pattern string, the puzzle, ...


@dataclass(frozen=True)
class Job:
    """One generation as the backends see it. Exactly one of ``messages``/``prompt`` is set."""

    messages: tuple[tuple[str, str], ...] | None  # (role, text) chat turns
    prompt: str | None  # raw completion prompt
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    constraint: Constraint | None = None
    request_id: str = ""
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context carrier
    # time.time() after which nobody waits for the answer: the model loops stop at their next step
    # (models/deadline.py) and the orchestration starts no further stage
    deadline: float | None = None


@dataclass(frozen=True)
class TextResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # ended by <eos> (else by the token budget)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TextChunk:
    """A piece of a streamed answer; the last chunk carries the whole result."""

    text: str
    result: TextResult | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    errors: tuple[str, ...] = ()  # human-readable, each naming where it points
    paths: tuple[str, ...] = ()  # JSON path of each error ("$.address.city"), where it has one
    spans: tuple[tuple[int, int], ...] = ()  # character span [start, end) of the answer per error


class DraftService(Protocol):
    async def draft(self, job: Job) -> TextResult: ...

    def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per committed canvas."""
        ...

    async def speculate(self, job: Job) -> TextResult:
        """Drafts verified by AR: AR's greedy answer at the drafter's pace."""
        ...

    def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per verification round."""
        ...


class ARService(Protocol):
    async def generate(self, job: Job) -> TextResult:
        """AR answer; under ``job.constraint`` when the backend can constrain decoding."""
        ...

    def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per token."""
        ...

    async def repair(self, job: Job, draft_text: str) -> TextResult:
        """Continue ``draft_text`` under the constraint from its longest accepted prefix."""
        ...


class ValidationService(Protocol):
    async def validate(self, constraint: Constraint, text: str, trace: dict[str, str] | None = None) -> Verdict:
        """``trace``: the W3C carrier of the caller's span (see ``pipeline/telemetry.py``)."""
        ...
