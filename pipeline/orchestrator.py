"""Orchestration of each path: draft -> validate -> repair/fallback, AR, streaming.

Guarantee for structured requests: an answer is returned as a success only after the validator
accepted it; otherwise the pipeline repairs or falls back on AR, and answers
:class:`OutputInvalid` (HTTP 422, with the validation messages) when that fails too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from opentelemetry.trace import SpanKind

from models.deadline import past

from . import telemetry
from .errors import (
    DeadlineExceeded,
    OutputInvalid,
    Overloaded,
    PipelineError,
    Unavailable,
)
from .health import DrafterHealth
from .interfaces import (
    ARService,
    DraftService,
    Job,
    Stats,
    TextChunk,
    TextResult,
    ValidationService,
)
from .router import (
    Load,
    RequestShape,
    RouteDecision,
    RouterPolicy,
    choose_route,
    failover,
)
from .streaming import StopScanner, cut_at_stop


@dataclass(frozen=True)
class Outcome:
    result: TextResult
    decision: RouteDecision
    stats: Stats = field(default_factory=Stats)


@dataclass(frozen=True)
class StructuredPolicy:
    # after a failed repair: "fallback" = a from-scratch constrained AR answer, "error" = 422
    on_repair_failure: str = "fallback"


class Pipeline:
    def __init__(self, drafter: DraftService | None, ar: ARService, validator: ValidationService,
                 policy: RouterPolicy | None = None, health: DrafterHealth | None = None,
                 structured: StructuredPolicy | None = None):
        self.drafter = drafter
        self.ar = ar
        self.validator = validator
        self.policy = policy or RouterPolicy()
        self.health = health or DrafterHealth()
        self.structured = structured or StructuredPolicy()
        self.drafts_in_flight = 0

    # -- routing ----------------------------------------------------------------------------
    def route(self, shape: RequestShape, trace: dict[str, str] | None = None) -> RouteDecision:
        load = Load(self.drafts_in_flight, self.drafter is not None and self.health.healthy())
        with telemetry.span("dgserve.route", trace) as sp:
            decision = choose_route(shape, load, self.policy)
            telemetry.attributes(sp, {"dgserve.route": decision.path, "dgserve.route_reason": decision.reason,
                                      "dgserve.drafter_queue": load.drafter_queue,
                                      "dgserve.drafter_in_rotation": load.drafter_healthy})
        return decision

    async def _ar(self, stage: str, method, job: Job, *args) -> TextResult:
        """An AR call (``stage``: generate | repair | fallback); a failing verifier is a clean 503
        (the request may be retried), never a hang or a stack trace."""
        _check_deadline(job, stage)
        with telemetry.span(f"dgserve.{stage}", job.trace, SpanKind.CLIENT) as sp:
            try:
                result = await method(replace(job, trace=telemetry.carrier_of(sp)), *args)
            except PipelineError:
                raise
            except Exception as e:
                raise Unavailable(f"the AR verifier failed ({type(e).__name__}); retry shortly",
                                  retry_after=1.0, code="verifier_unavailable") from e
            telemetry.attributes(sp, {telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens})
            return result

    async def _validate(self, job: Job, text: str):
        _check_deadline(job, "validate")
        with telemetry.span("dgserve.validate", job.trace, SpanKind.CLIENT) as sp:
            verdict = await self.validator.validate(job.constraint, text, telemetry.carrier_of(sp))
            telemetry.attributes(sp, {"dgserve.validation.ok": verdict.ok})
            return verdict

    # -- non-streaming ----------------------------------------------------------------------
    async def run(self, job: Job, decision: RouteDecision, stops: list[str] | None = None,
                  stats: Stats | None = None) -> Outcome:
        """``stats``, when given, is filled as the stages run, so a caller sees them on failure too."""
        stops = stops or []
        stats = Stats() if stats is None else stats
        if decision.path == "ar":
            result = await self._ar("generate", self.ar.generate, job)
            stats.update(result.stats)
        else:
            result, decision = await self._draft_or_ar(job, decision, stats)
        result = _apply_stops(result, stops)
        if job.constraint is not None:
            result = await self._ensure_valid(job, result, stops, stats)
        return Outcome(result, decision, stats)

    async def _draft_or_ar(self, job: Job, decision: RouteDecision, stats: Stats
                           ) -> tuple[TextResult, RouteDecision]:
        if self.drafter is None:
            raise Unavailable("no drafter is configured")
        verify = decision.path == "verify"
        call = self.drafter.speculate if verify else self.drafter.draft
        wait = (None if job.deadline is None or decision.requested
                else max(0.0, job.deadline - time.time()) * self.policy.drafter_deadline_share)
        self.drafts_in_flight += 1
        try:
            with telemetry.span("dgserve.speculate" if verify else "dgserve.draft", job.trace, SpanKind.CLIENT) as sp:
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

    async def _ensure_valid(self, job: Job, result: TextResult, stops: list[str], stats: Stats) -> TextResult:
        """Validate; if invalid, repair from the longest good prefix; then, by policy, a
        from-scratch constrained AR answer; else :class:`OutputInvalid`. Never an invalid success.
        A repair that kept no draft token WAS that from-scratch answer (vLLM's repair always is), so
        the fallback is not run a second time."""
        verdict = await self._validate(job, result.text)
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
        verdict = await self._validate(job, result.text)
        errors += verdict.errors
        if (not verdict.ok and self.structured.on_repair_failure == "fallback"
                and result.stats.repair_reused_tokens != 0):
            stats.fallback_used = True
            result = _apply_stops(await self._ar("fallback", self.ar.generate, job), stops)
            verdict = await self._validate(job, result.text)
            errors += verdict.errors
        if not verdict.ok:
            raise OutputInvalid("no answer satisfying the response_format was produced: "
                                + "; ".join(errors[:4]), code="validation_failed")
        stats.validated = True
        return result

    # -- streaming --------------------------------------------------------------------------
    async def stream(self, job: Job, decision: RouteDecision, stops: list[str] | None = None,
                     stats: Stats | None = None) -> AsyncIterator[TextChunk]:
        """Chunks of the answer; the last one carries the result. Structured answers are sent
        only once validated (one chunk), so a stream never shows an invalid answer."""
        stops = stops or []
        if job.constraint is not None:
            outcome = await self.run(job, decision, stops, stats)
            yield TextChunk(outcome.result.text, replace(outcome.result, stats=outcome.stats))
            return
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
