"""Orchestration of each path: draft -> validate -> repair/fallback, AR, streaming.

Guarantee for structured requests: an answer is returned as a success only after the validator
accepted it; otherwise the pipeline repairs or falls back on AR, and answers
:class:`OutputInvalid` (HTTP 422, with the validation messages) when that fails too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Sequence

from opentelemetry.trace import SpanKind

from models.deadline import past

from . import telemetry, watch
from .errors import (
    BadRequest,
    DeadlineExceeded,
    OutputInvalid,
    Overloaded,
    PipelineError,
    Unavailable,
)
from .health import DrafterHealth
from .interfaces import (
    ARService,
    Constraint,
    ConstraintKind,
    DraftService,
    Job,
    Stats,
    TextChunk,
    TextResult,
    ValidationService,
)
from .rejections import classify, retry_plan
from .route_estimates import PATHS, RouteEstimates, ShapeKey
from .router import (
    Load,
    RequestShape,
    RouteDecision,
    RouterPolicy,
    below_floor,
    choose_route,
    eligible_paths,
    failover,
)
from .streaming import StopScanner, cut_at_stop


@dataclass(frozen=True)
class Outcome:
    result: TextResult
    decision: RouteDecision
    stats: Stats = field(default_factory=Stats)


RETRY_MARGIN_S = 0.2  # retries end this long before the request's deadline


@dataclass(frozen=True)
class StructuredPolicy:
    # after a failed repair: "fallback" = a from-scratch constrained AR answer, "error" = 422
    on_repair_failure: str = "fallback"
    # after a failed fallback: at most this many answers decoded under a narrower schema or
    # sampled (pipeline/rejections.py:retry_plan), each validated against the original
    max_retries: int = 3


class Pipeline:
    def __init__(self, drafter: DraftService | None, ar: ARService, validator: ValidationService,
                 policy: RouterPolicy | None = None, health: DrafterHealth | None = None,
                 structured: StructuredPolicy | None = None, estimates: RouteEstimates | None = None):
        self.drafter = drafter
        self.ar = ar
        self.validator = validator
        self.policy = policy or RouterPolicy()
        self.health = health or DrafterHealth()
        self.structured = structured or StructuredPolicy()
        self.estimates = estimates or RouteEstimates(self.policy.estimate_decay)
        # the verify route can sample (a drafter that does not say is taken as greedy only)
        self.sampled_verify = bool(getattr(drafter, "sampled_verify", False))
        self.drafts_in_flight = 0
        self.in_flight = 0  # requests on any path (what the cost estimates are a line in)
        self.routed = 0  # auto decisions made by measurement (the exploration clock)
        self.last_measured: dict[str, int] = {}  # path -> ``routed`` when it last served a request
        self.diffusion_answers = 0  # the shadow-verification clock
        self.calibrating = False
        self.recording = True  # costs are recorded (off only for a calibration's warm-up)
        self.background: set[asyncio.Task] = set()  # shadow verifications in flight

    # -- routing ----------------------------------------------------------------------------
    def route(self, shape: RequestShape, trace: dict[str, str] | None = None) -> RouteDecision:
        load = Load(self.drafts_in_flight, self.drafter is not None and self.health.healthy(), self.in_flight)
        paths = eligible_paths(shape, self.drafter is not None, self.sampled_verify)
        with telemetry.span("dgserve.route", trace) as sp:
            estimates = (self.estimates.for_shape(shape.key(), paths)
                         if self.policy.kind == "measured" else None)
            decision = choose_route(shape, load, self.policy, estimates, paths)
            if decision.predicted and not decision.requested:
                decision = self._explore(decision, estimates or {})
            telemetry.attributes(sp, {"dgserve.route": decision.path, "dgserve.route_reason": decision.reason,
                                      "dgserve.drafter_queue": load.drafter_queue, "dgserve.in_flight": load.in_flight,
                                      "dgserve.drafter_in_rotation": load.drafter_healthy})
        return decision

    def _explore(self, decision: RouteDecision, estimates: dict) -> RouteDecision:
        """Every ``1 / explore_share``-th measured decision goes to the other eligible path measured
        least recently, so an estimate that was once too high can still come down."""
        self.routed += 1
        share = self.policy.explore_share
        if share <= 0 or self.routed % max(1, round(1 / share)):
            return decision
        eligible = [p for p in estimates if p != decision.path
                    and not below_floor(estimates[p], self.policy)]
        if not eligible:
            return decision
        path = min(eligible, key=lambda p: self.last_measured.get(p, -1))
        ago = self.routed - self.last_measured.get(path, 0)
        return replace(decision, path=path, explored=True,
                       reason=f"exploring {path} (last measured {ago} decisions ago); {decision.reason}")

    # -- measurement --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _measured(self, job: Job, decision: RouteDecision, stream: bool):
        """Counts the request in flight; ``done(first_chunk_s)`` records its cost under the routed
        path (a failover's cost included: it is what choosing that path cost)."""
        start, in_flight = time.perf_counter(), self.in_flight
        self.in_flight += 1

        def done(first_chunk_s: float | None = None) -> None:
            if not self.recording:
                return
            key = ShapeKey.of(job.constraint is not None, stream, job.max_tokens)
            self.estimates.observe(decision.path, key, in_flight, time.perf_counter() - start, first_chunk_s,
                                   calibration=self.calibrating)
            self.last_measured[decision.path] = self.routed

        try:
            yield done
        finally:
            self.in_flight -= 1

    def _shadow(self, job: Job, decision: RouteDecision, result: TextResult) -> None:
        """Score a sampled share of diffusion answers with the AR verifier, off the critical path."""
        if decision.path != "diffusion" or not hasattr(self.ar, "agreement"):
            return
        if not self.calibrating:
            self.diffusion_answers += 1
            share = self.policy.shadow_share
            if share <= 0 or self.diffusion_answers % max(1, round(1 / share)):
                return
        key = ShapeKey.of(job.constraint is not None, False, job.max_tokens)
        task = asyncio.get_running_loop().create_task(self._score(job, result, key))
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _score(self, job: Job, result: TextResult, key: ShapeKey) -> None:
        with telemetry.span("dgserve.shadow_verify", job.trace, SpanKind.CLIENT) as sp:
            try:
                agreement = await self.ar.agreement(replace(job, deadline=None, trace=telemetry.carrier_of(sp)), result)
            except Exception as e:  # a shadow score is best effort: it never touches the request
                telemetry.fail(sp, e)
                return
            if agreement is not None:
                self.estimates.observe_agreement("diffusion", key, agreement)
                sp.set_attribute("dgserve.agreement", agreement)

    async def calibrate(self, jobs: Sequence[tuple[Job, bool]], repeats: int) -> None:
        """Seed the estimates before serving: every (job, stream) on every path ``repeats`` times,
        one at a time, after one unrecorded warm-up request per path; diffusion answers are all
        shadow-verified. A request that fails is skipped (its path keeps no estimate from it)."""
        if repeats <= 0 or not jobs:
            return
        self.calibrating = True
        try:
            for path in (PATHS if self.drafter is not None else ("ar",)):
                decision = RouteDecision(path, "calibration", requested=True)  # type: ignore[arg-type]
                for i in range(1 + repeats * len(jobs)):
                    job, stream = jobs[max(0, i - 1) % len(jobs)]
                    job = replace(job, request_id=f"calibration-{path}-{i}")
                    self.recording = i > 0  # the first request per path warms it up, unrecorded
                    try:
                        if stream:
                            async for _ in self.stream(job, decision):
                                pass
                        else:
                            await self.run(job, decision)
                    except PipelineError:
                        pass
            if self.background:
                await asyncio.gather(*list(self.background), return_exceptions=True)
        finally:
            self.calibrating, self.recording = False, True

    async def _ar(self, stage: str, method, job: Job, *args) -> TextResult:
        """An AR call (``stage``: generate | repair | fallback); a failing verifier is a clean 503
        (the request may be retried), never a hang or a stack trace."""
        _check_deadline(job, stage)
        with telemetry.span(f"dgserve.{stage}", job.trace, SpanKind.CLIENT) as sp, watch.stage(stage):
            try:
                result = await method(replace(job, trace=telemetry.carrier_of(sp)), *args)
            except PipelineError:
                raise
            except Exception as e:
                raise Unavailable(f"the AR verifier failed ({type(e).__name__}); retry shortly",
                                  retry_after=1.0, code="verifier_unavailable") from e
            telemetry.attributes(sp, {telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens})
            return result

    async def _validate(self, job: Job, text: str, of: str):
        """The validator's verdict on ``text``, the answer of stage ``of`` (draft, repair, ...)."""
        _check_deadline(job, "validate")
        with telemetry.span("dgserve.validate", job.trace, SpanKind.CLIENT) as sp, watch.stage(f"validate {of}"):
            verdict = await self.validator.validate(job.constraint, text, telemetry.carrier_of(sp))
            telemetry.attributes(sp, {"dgserve.validation.ok": verdict.ok})
        if (w := watch.current()) is not None:
            w.emit("verdict", of=of, text=text, ok=verdict.ok, errors=list(verdict.errors), paths=list(verdict.paths),
                   spans=[list(span) for span in verdict.spans])
        return verdict

    # -- non-streaming ----------------------------------------------------------------------
    async def run(self, job: Job, decision: RouteDecision, stops: list[str] | None = None,
                  stats: Stats | None = None, stream: bool = False) -> Outcome:
        """``stats``, when given, is filled as the stages run, so a caller sees them on failure too.
        ``stream``: the client streams it (the shape its cost is recorded under)."""
        stats = Stats() if stats is None else stats
        with self._measured(job, decision, stream) as done:
            outcome = await self._run(job, decision, stops or [], stats)
            done(None if job.constraint is not None else stats.first_token_s or stats.first_chunk_s)
        self._shadow(job, decision, outcome.result)
        return outcome

    async def _run(self, job: Job, decision: RouteDecision, stops: list[str], stats: Stats) -> Outcome:
        if decision.path == "ar":
            result = await self._ar("generate", self.ar.generate, job)
            stats.update(result.stats)
        else:
            result, decision = await self._draft_or_ar(job, decision, stats)
        result = _apply_stops(result, stops)
        if job.constraint is not None:
            result = await self._ensure_valid(job, result, stops, stats, "draft" if decision.path != "ar" else "ar")
        return Outcome(result, decision, stats)

    async def _draft_or_ar(self, job: Job, decision: RouteDecision, stats: Stats
                           ) -> tuple[TextResult, RouteDecision]:
        if self.drafter is None:
            raise Unavailable("no drafter is configured")
        verify = decision.path == "verify"
        call = self.drafter.speculate if verify else self.drafter.draft
        w = watch.current()
        if w is not None:  # the same drafter, asked to show its steps (and rounds)
            call = _watched_speculate(self.drafter.speculate, w) if verify else _watched_draft(self.drafter.draft_stream, w)
        wait = (None if job.deadline is None or decision.requested
                else max(0.0, job.deadline - time.time()) * self.policy.drafter_deadline_share)
        self.drafts_in_flight += 1
        try:
            stage = "speculate" if verify else "draft"
            with telemetry.span(f"dgserve.{stage}", job.trace, SpanKind.CLIENT) as sp, watch.stage(stage):
                result = await asyncio.wait_for(call(replace(job, trace=telemetry.carrier_of(sp))), wait)
                telemetry.attributes(sp, result.stats.as_dict(), "dgserve.")
        except asyncio.TimeoutError:  # the drafter holds the request without answering: AR serves it
            self.health.failure()
            stats.drafter_error = "timeout"
            result = await self._ar("generate", self.ar.generate, job)
            return result, failover("late", f"{wait:.3g} s")
        except Overloaded:  # drafter queue full: AR serves it; the drafter is busy, not broken
            stats.drafter_overloaded = True
            result = await self._ar("generate", self.ar.generate, job)
            return result, failover("overloaded")
        except PipelineError:  # the request's own fault (e.g. a constraint too complex): no health hit
            raise
        except Exception as e:  # a failing drafter replica must not fail the request
            self.health.failure()
            stats.drafter_error = type(e).__name__
            result = await self._ar("generate", self.ar.generate, job)
            return result, failover("failed", type(e).__name__)
        finally:
            self.drafts_in_flight -= 1
        self.health.success()
        stats.update(result.stats)
        return result, decision

    async def _ensure_valid(self, job: Job, result: TextResult, stops: list[str], stats: Stats,
                            first: str = "draft") -> TextResult:
        """Validate; if invalid, repair from the longest good prefix; then, by policy, a
        from-scratch constrained AR answer; else :class:`OutputInvalid`. Never an invalid success.
        A repair that kept no draft token WAS that from-scratch answer (vLLM's repair always is), so
        the fallback is not run a second time. ``first``: the stage that made ``result`` (draft, ar)."""
        verdict = await self._validate(job, result.text, first)
        stats.draft_valid = verdict.ok
        if verdict.ok:
            stats.validated = True
            return result
        errors = list(verdict.errors)
        stats.repair_used = True
        draft = result
        result = _apply_stops(await self._ar("repair", self.ar.repair, job, draft), stops)
        stats.repair_reused_tokens = result.stats.repair_reused_tokens
        stats.draft_tokens = result.stats.draft_tokens
        if (w := watch.current()) is not None:
            kept = result.stats.repair_reused_chars or 0
            w.emit("repair", draft=draft.text, kept_tokens=result.stats.repair_reused_tokens,
                   draft_tokens=result.stats.draft_tokens, kept=result.text[:kept], added=result.text[kept:])
        verdict = await self._validate(job, result.text, "repair")
        errors += verdict.errors
        if (not verdict.ok and self.structured.on_repair_failure == "fallback"
                and result.stats.repair_reused_tokens != 0):
            stats.fallback_used = True
            result = _apply_stops(await self._ar("fallback", self.ar.generate, job), stops)
            verdict = await self._validate(job, result.text, "fallback")
            errors += verdict.errors
        if not verdict.ok:
            cause = classify(bool(result.stats.constrained), result.finished, verdict.keywords)
            if self.structured.on_repair_failure == "fallback" and job.constraint.kind == ConstraintKind.JSON_SCHEMA:
                retried = await self._retry(job, cause, stops, stats)
                if retried is not None:
                    stats.validated = True
                    return retried
            stats.rejection_cause = cause.value
            raise OutputInvalid(f"no answer satisfying the response_format was produced (cause: {cause.value}): "
                                + "; ".join(errors[:4]), code="validation_failed")
        stats.validated = True
        return result

    async def _retry(self, job: Job, cause, stops: list[str], stats: Stats) -> TextResult | None:
        """Answer again under each step of the cause's retry plan until one validates against the
        original constraint; None when none does (or the deadline comes first)."""
        # a retry is a second chance, never the reason for a 504: it stops short of the deadline
        # (the model loop stops there too), and the request is answered 422 with its cause
        end = None if job.deadline is None else job.deadline - RETRY_MARGIN_S
        for label, schema, temperature, seed in retry_plan(cause, job.constraint.spec, self.structured.max_retries):
            left = None if end is None else end - time.time()
            if left is not None and left <= 0:
                return None
            narrowed = replace(job, constraint=Constraint(ConstraintKind.JSON_SCHEMA, schema),
                               temperature=temperature, seed=seed if temperature else job.seed, deadline=end)
            stats.retries = (stats.retries or 0) + 1
            try:
                result = await asyncio.wait_for(self._ar("retry", self.ar.generate, narrowed), left)
            except BadRequest:  # the narrowed schema does not compile: the next step may
                continue
            except (asyncio.TimeoutError, DeadlineExceeded):
                return None
            result = _apply_stops(result, stops)
            if not result.finished and result.stats.expired:  # stopped at the retry's deadline
                return None
            if (await self._validate(job, result.text, f"retry {label}")).ok:
                stats.retry_used = label
                return result
        return None

    # -- streaming --------------------------------------------------------------------------
    async def stream(self, job: Job, decision: RouteDecision, stops: list[str] | None = None,
                     stats: Stats | None = None) -> AsyncIterator[TextChunk]:
        """Chunks of the answer; the last one carries the result. Structured answers are sent
        only once validated (one chunk), so a stream never shows an invalid answer."""
        stops = stops or []
        if job.constraint is not None:
            outcome = await self.run(job, decision, stops, stats, stream=True)
            yield TextChunk(outcome.result.text, replace(outcome.result, stats=outcome.stats))
            return
        with self._measured(job, decision, True) as done:
            async for chunk in self._stream(job, decision, stops, stats, done):
                yield chunk

    async def _stream(self, job: Job, decision: RouteDecision, stops: list[str], stats: Stats | None,
                      done) -> AsyncIterator[TextChunk]:
        start = time.perf_counter()
        first_chunk_s = None
        scanner = StopScanner(stops)
        if decision.path != "ar" and self.drafter is None:
            raise Unavailable("no drafter is configured")
        stage = {"ar": "stream", "verify": "speculate_stream"}.get(decision.path, "draft_stream")
        sp = telemetry.tracer().start_span(f"dgserve.{stage}", context=telemetry.parent(job.trace),
                                           kind=SpanKind.CLIENT)
        job = replace(job, trace=telemetry.carrier_of(sp))
        if decision.path == "ar":
            source = self.ar.stream(job)
        elif decision.path == "verify":
            source = self.drafter.speculate_stream(job)
        else:
            source = self.drafter.draft_stream(job)
        final: TextResult | None = None
        sent = ""
        self.drafts_in_flight += decision.path != "ar"
        try:
            async for chunk in _guard_stream(source, decision.path):
                if chunk.result is not None:
                    final = chunk.result
                    break
                piece = scanner.push(chunk.text)
                if piece:
                    sent += piece
                    if first_chunk_s is None:
                        first_chunk_s = time.perf_counter() - start
                    yield TextChunk(piece)
                if scanner.stopped:
                    break
        except Exception as e:
            telemetry.fail(sp, e)
            raise
        finally:
            self.drafts_in_flight -= decision.path != "ar"
            if final is not None:
                telemetry.attributes(sp, final.stats.as_dict(), "dgserve.")
                if stats is not None:
                    stats.update(final.stats)
            sp.end()
            if hasattr(source, "aclose"):
                await source.aclose()
        tail = "" if scanner.stopped else scanner.flush()
        if tail:
            sent += tail
            yield TextChunk(tail)
        if final is None:
            final = TextResult(sent, 0, 0, True)
        done(first_chunk_s)
        self._shadow(job, decision, replace(final, text=sent, token_ids=final.token_ids if sent == final.text else None))
        yield TextChunk("", replace(final, text=sent, finished=final.finished or scanner.stopped,
                                    token_ids=final.token_ids if sent == final.text else None))


def _check_deadline(job: Job, stage: str) -> None:
    """No further stage for a request whose deadline has passed (its client has been answered 504,
    or is about to be): the work would only hold a replica."""
    if past(job.deadline):
        raise DeadlineExceeded(f"request deadline passed before the {stage} stage", code="deadline_exceeded")


def _apply_stops(result: TextResult, stops: list[str]) -> TextResult:
    if not stops:
        return result
    text, hit = cut_at_stop(result.text, stops)
    return replace(result, text=text, finished=result.finished or hit, token_ids=None) if hit else result


async def _guard_stream(source: AsyncIterator[TextChunk], path: str) -> AsyncIterator[TextChunk]:
    """A backend failing mid-stream ends the stream with a clean 503 error frame."""
    try:
        async for chunk in source:
            yield chunk
    except PipelineError:
        raise
    except Exception as e:
        raise Unavailable(f"the {path} backend failed mid-stream ({type(e).__name__})", retry_after=1.0) from e


def _watched_speculate(call, w: "watch.RunWatch"):
    """``call`` (the verify route) for a watched job: its rounds are reported once it returns."""
    async def run(job: Job) -> TextResult:
        result = await call(replace(job, watch=True))
        st = result.stats
        if st.accepted is not None:
            w.emit("rounds", accepted=list(st.accepted), texts=list(st.round_texts or ()),
                   corrections=list(st.round_corrections or ()))
        w.emit("draft", text=result.text, stats=st.as_dict())
        return result
    return run


def _watched_draft(draft_stream, w: "watch.RunWatch"):
    """The drafter's stream for a watched job: each denoising step and canvas commit is reported as
    it arrives; returns the draft's result, as ``draft`` would."""
    async def run(job: Job) -> TextResult:
        source = draft_stream(replace(job, watch=True))
        result = None
        try:
            async for chunk in source:
                if chunk.step is not None:
                    w.emit("step", **chunk.step.payload())
                elif chunk.result is not None:
                    result = chunk.result
                elif chunk.text:
                    w.emit("commit", text=chunk.text)
        finally:
            if hasattr(source, "aclose"):
                await source.aclose()
        if result is None:
            raise RuntimeError("the draft stream ended without a result")
        w.emit("draft", text=result.text, stats=result.stats.as_dict())
        return result
    return run
