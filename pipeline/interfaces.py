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

from dataclasses import dataclass, field, fields
from typing import Any, AsyncIterator, Protocol

from models.constraints import (
    ConstraintKind as ConstraintKind,  # the closed set, with the models that compile it
)

from .watch import CanvasStep


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
    # someone watches this request (pipeline/watch.py): the drafter sends each denoising step, the
    # verify route the text of each round
    watch: bool = False


@dataclass
class Stats:
    """What the stages report about one answer: the response's ``stats``, the spans' ``dgserve.*``
    attributes and the metrics read these fields. ``None``: the stage that reports it did not run."""

    backend: str | None = None  # "vllm" where the vLLM engines served it
    # the draft (models/drafter.py)
    canvases: int | None = None
    canvas_steps: tuple[int, ...] | None = None  # denoising steps of each canvas
    denoising_steps: int | None = None
    steps_per_canvas: float | None = None
    tokens_per_forward: float | None = None
    first_chunk_s: float | None = None
    draft_s: float | None = None
    batch_size: int | None = None  # requests in the denoising batch
    canvas_guided: bool | None = None  # the grammar steered the canvas
    expired: bool | None = None  # a model loop stopped at the request's deadline
    seed_ignored: bool | None = None  # the backend cannot honour a client's seed
    # the verify route (models/speculative.py)
    drafts: int | None = None
    mean_accepted: float | None = None
    accepted: tuple[int, ...] | None = None  # tokens accepted per round
    verifier_forwards: int | None = None
    verifier_forwards_per_token: float | None = None
    verify_s: float | None = None
    round_texts: tuple[str, ...] | None = None  # watched requests only: each round's accepted text
    round_corrections: tuple[str, ...] | None = None  # watched: each round's correction token ("" at the end)
    # AR
    first_token_s: float | None = None
    ar_s: float | None = None
    constrained: bool | None = None  # decoded under the grammar
    # repair: draft tokens kept (0: answered from scratch) of the draft's tokens
    repair_reused_tokens: int | None = None
    repair_reused_chars: int | None = None  # the kept tokens' length as text
    draft_tokens: int | None = None
    # the orchestration (pipeline/orchestrator.py)
    drafter_overloaded: bool | None = None
    drafter_error: str | None = None  # the drafter's exception type; AR served the request
    draft_valid: bool | None = None
    repair_used: bool | None = None
    fallback_used: bool | None = None
    validated: bool | None = None
    retries: int | None = None  # answers decoded after the fallback (pipeline/rejections.py:retry_plan)
    retry_used: str | None = None  # the retry step whose answer validated
    rejection_cause: str | None = None  # why no valid answer was produced (pipeline/rejections.py)

    def update(self, other: "Stats") -> None:
        """Take every field ``other`` reports."""
        for f in fields(self):
            value = getattr(other, f.name)
            if value is not None:
                setattr(self, f.name, value)

    def merged(self, **values: Any) -> "Stats":
        """A copy with ``values`` set."""
        out = Stats()
        out.update(self)
        for name, value in values.items():
            setattr(out, name, value)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The reported fields (sequences as lists)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class TextResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finished: bool  # ended by <eos> (else by the token budget)
    stats: Stats = field(default_factory=Stats)
    # the answer's token ids, where they are exactly ``text`` (None once text was cut, e.g. at a stop)
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TextChunk:
    """A piece of a streamed answer; the last chunk carries the whole result. A watched draft's
    stream also carries each denoising step (``step``, with empty ``text``)."""

    text: str
    result: TextResult | None = None
    step: CanvasStep | None = None


@dataclass(frozen=True)
class Verdict:
    ok: bool
    errors: tuple[str, ...] = ()  # human-readable, each naming where it points
    paths: tuple[str, ...] = ()  # JSON path of each error ("$.address.city"), where it has one
    spans: tuple[tuple[int, int], ...] = ()  # character span [start, end) of the answer per error
    # the schema keywords the errors failed ("required", "oneOf", ...), "$ref" where one was reached
    # through a reference, "json" for an answer that is not JSON (pipeline/rejections.py reads them)
    keywords: tuple[str, ...] = ()


class DraftService(Protocol):
    # the verify route accepts a sampling temperature (its verifier shares this process and cache);
    # False: greedy only, and the router does not send it sampled requests
    sampled_verify: bool

    async def draft(self, job: Job) -> TextResult: ...

    def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per committed canvas."""
        ...

    async def speculate(self, job: Job) -> TextResult:
        """Drafts verified by AR: AR's answer (greedy, or sampled where ``sampled_verify``) at the
        drafter's pace."""
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

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        """Continue ``draft`` (its token ids where it has them, else its text) under the constraint
        from its longest accepted prefix; ``stats.repair_reused_tokens`` says how much was kept
        (0: the answer was made from scratch)."""
        ...

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        """Shadow verification: the share of ``answer`` AR's greedy decoding agrees with (the
        accepted prefix of one verify forward, over the answer's length); None: nothing to score."""
        ...


class ValidationService(Protocol):
    async def validate(self, constraint: Constraint, text: str, trace: dict[str, str] | None = None) -> Verdict:
        """``trace``: the W3C carrier of the caller's span (see ``pipeline/telemetry.py``)."""
        ...
