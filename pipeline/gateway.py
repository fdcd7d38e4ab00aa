"""The OpenAI-compatible surface as plain Python: raw request in, status + body (or SSE) out.

The Ray ingress only moves bytes between FastAPI and this class, so every rule here (parsing,
limits, model names, routing headers, error objects, streaming format) is testable without Ray.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from pydantic import ValidationError

from . import telemetry
from .api import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
    RouteInfo,
    Usage,
)
from .errors import (
    BadRequest,
    DeadlineExceeded,
    HTTPStatusError,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    PipelineError,
    Unauthorized,
)
from .interfaces import Constraint, ConstraintKind, Job, Stats, TextResult
from .orchestrator import Outcome, Pipeline
from .router import RequestShape, RouteDecision
from .telemetry import Metrics, NoMetrics, RequestObservation
from .validation import ConstraintError, ValidatorRegistry, default_registry
from .watch import RunWatch, watching


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 512  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_prompt_chars: int = 32_000
    max_body_bytes: int = 1_000_000
    request_timeout_s: float = 60.0  # a request may ask for less with x-request-timeout-seconds
    max_in_flight: int = 48  # generation requests one ingress replica holds at once; beyond: 429 at once


@dataclass
class Reply:
    status: int
    body: dict[str, Any] | None = None
    stream: AsyncIterator[bytes] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(err: PipelineError) -> Reply:
    """The one builder of an error answer (HTTP bodies, SSE error frames, the ingress' own)."""
    body = ErrorResponse(error=ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    headers = {}
    if err.retry_after is not None:
        headers["retry-after"] = str(max(1, round(err.retry_after)))
    return Reply(err.status, body.model_dump(), headers=headers)


def _event(body: dict) -> bytes:
    """One server-sent event carrying ``body`` as JSON."""
    return f"data: {json.dumps(body)}\n\n".encode()


def playground_off() -> Reply:
    """What the playground's endpoints answer on a deployment that has it off."""
    return error_reply(HTTPStatusError(404, "the playground is not enabled on this deployment"))


def _named(kind: str, body: dict) -> bytes:
    """One server-sent event named ``kind`` (a watched run's event)."""
    return f"event: {kind}\ndata: {json.dumps(body)}\n\n".encode()


def _answer(req, outcome: Outcome, chat: bool) -> ChatCompletion | Completion:
    """The completion body of a finished run."""
    r = outcome.result
    usage = _usage(r)
    finish = "stop" if r.finished else "length"
    route = RouteInfo(path=outcome.decision.path, reason=outcome.decision.reason)
    stats = {k: v for k, v in outcome.stats.as_dict().items() if isinstance(v, (int, float, bool, str))}
    if chat:
        return ChatCompletion(model=req.model, usage=usage, route=route, stats=stats,
                              choices=[ChatChoice(message=AssistantMessage(content=r.text), finish_reason=finish)])
    return Completion(model=req.model, usage=usage, route=route, stats=stats,
                      choices=[CompletionChoice(text=r.text, finish_reason=finish)])


def _past_deadline(timeout: float) -> DeadlineExceeded:
    return DeadlineExceeded(f"no answer within the request deadline of {timeout:g} s", code="deadline_exceeded")


def _usage(r: TextResult) -> Usage:
    return Usage(prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
                 total_tokens=r.prompt_tokens + r.completion_tokens)


def _pydantic_message(e: ValidationError) -> tuple[str, str | None]:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body",))
    return f"{loc or 'body'}: {first.get('msg', 'invalid value')}", loc or None


MAX_BODY_DEPTH = 100  # nesting of objects/arrays in a request body (a schema may nest 24 levels itself)
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of objects/arrays in the JSON text ``raw``, found without parsing it (so a
    hostile body cannot make a recursive decoder overflow its stack): strings are dropped, then the
    running sum of opening (+1) and closing (-1) brackets peaks at the depth. Example:
    ``b'{"a": [1, {"b": "]]"}]}'`` -> 3."""
    import numpy as np

    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _constraint(fmt) -> Constraint | None:
    if fmt is None or not fmt.structured:
        return None
    if fmt.type == ConstraintKind.JSON_SCHEMA:
        return Constraint(ConstraintKind.JSON_SCHEMA, fmt.json_schema.schema_)
    if fmt.type == ConstraintKind.REGEX:
        return Constraint(ConstraintKind.REGEX, fmt.regex.pattern)
    if fmt.type == ConstraintKind.SUDOKU:
        return Constraint(ConstraintKind.SUDOKU, fmt.sudoku.puzzle)
    if fmt.type == ConstraintKind.JSON_OBJECT:
        return Constraint(ConstraintKind.JSON_OBJECT, None)
    return Constraint(fmt.type, None)  # a custom validator's kind


class _Slot:
    """One admitted stream's place in ``Gateway.in_flight``, released exactly once."""

    def __init__(self, gateway: "Gateway"):
        self.gateway: Gateway | None = gateway

    def release(self) -> None:
        if self.gateway is not None:
            self.gateway.in_flight -= 1
            self.gateway = None


class RequestRecord:
    """One request's root span and clock; ``close`` ends the span and reports the metrics."""

    def __init__(self, operation: str, model: str, headers: Mapping[str, str], metrics: Metrics):
        self.start = time.perf_counter()
        self.metrics = metrics
        self.model = model
        self.operation = operation
        self.span = telemetry.start_request_span(f"{operation} {model}", headers)
        telemetry.attributes(self.span, {telemetry.GEN_AI_OPERATION: operation, telemetry.GEN_AI_PROVIDER: "dgserve",
                                         telemetry.GEN_AI_REQUEST_MODEL: model})
        self.carrier = telemetry.carrier_of(self.span)
        self.route = "none"
        self.stream = False
        self.structured = False
        self.first_chunk_s: float | None = None
        self.decision: RouteDecision | None = None  # the router's, before any failover
        self.stats = Stats()  # filled by the pipeline as its stages run
        self.closed = False

    def model_is(self, model: str) -> None:
        """The model the request named (the span was opened under the default's name)."""
        if model != self.model:
            self.model = model
            self.span.update_name(f"{self.operation} {model}")
            self.span.set_attribute(telemetry.GEN_AI_REQUEST_MODEL, model)

    def request(self, job: Job, decision: RouteDecision, stream: bool) -> None:
        self.route, self.stream, self.structured = decision.path, stream, job.constraint is not None
        self.decision = decision
        telemetry.attributes(self.span, {
            telemetry.GEN_AI_MAX_TOKENS: job.max_tokens, telemetry.GEN_AI_TEMPERATURE: job.temperature,
            telemetry.GEN_AI_OUTPUT_TYPE: "json" if job.constraint is not None else "text",
            "dgserve.route": decision.path, "dgserve.route_reason": decision.reason, "dgserve.stream": stream,
            "dgserve.request_id": job.request_id,
        })
        if job.seed is not None:
            self.span.set_attribute(telemetry.GEN_AI_SEED, job.seed)
        if job.constraint is not None:
            self.span.set_attribute("dgserve.constraint", job.constraint.kind)

    def first_chunk(self) -> None:
        if self.first_chunk_s is None:
            self.first_chunk_s = time.perf_counter() - self.start

    def close(self, status: int, result=None, decision: RouteDecision | None = None,
              response_id: str | None = None, error: PipelineError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if decision is not None and decision.path != self.route:  # the drafter failed over to AR
            self.route = decision.path
            telemetry.attributes(self.span, {"dgserve.route": decision.path, "dgserve.route_reason": decision.reason})
        stats = self.stats
        self.span.set_attribute("http.response.status_code", status)
        if result is not None:
            telemetry.attributes(self.span, {
                telemetry.GEN_AI_INPUT_TOKENS: result.prompt_tokens, telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens,
                telemetry.GEN_AI_RESPONSE_MODEL: self.model,
            })
            self.span.set_attribute(telemetry.GEN_AI_FINISH_REASONS, ["stop" if result.finished else "length"])
        if response_id:
            self.span.set_attribute(telemetry.GEN_AI_RESPONSE_ID, response_id)
        telemetry.attributes(self.span, {f"dgserve.{key}": getattr(stats, key) for key in (
            "draft_valid", "repair_used", "fallback_used", "validated", "drafter_overloaded", "drafter_error")
            if getattr(stats, key) is not None})
        if error is not None:
            telemetry.fail(self.span, error)
        self.span.end()
        total = time.perf_counter() - self.start
        try:
            routed = self.decision
            self.metrics.observe(RequestObservation(self.route, status, self.stream, self.structured, total,
                                                    self.first_chunk_s, stats, routed.shape if routed else "",
                                                    routed.predicted if routed else (), self.model))
        except Exception:  # metrics must never fail a request
            pass


class Gateway:
    """``api_key``: when set, every endpoint but ``/health`` needs ``Authorization: Bearer <key>``.
    Header names are lower-case in the ``headers`` mappings. ``metrics`` receives one
    :class:`RequestObservation` per answered request."""

    def __init__(self, pipeline: Pipeline, model_name: str, limits: Limits | None = None,
                 registry: ValidatorRegistry | None = None, api_key: str | None = None,
                 metrics: Metrics | None = None, others: Mapping[str, Pipeline] | None = None,
                 playground: bool = False):
        """``pipeline`` serves ``model_name`` (the default model); ``others``: further models by
        name, each its own pipeline (a request picks one with its ``model``). ``playground``: the
        watched runs of :meth:`playground_run` are served (else 404)."""
        self.pipeline = pipeline
        self.model_name = model_name
        self.pipelines: dict[str, Pipeline] = {model_name: pipeline, **(others or {})}
        self.limits = limits or Limits()
        self.registry = registry or default_registry()
        self.api_key = api_key or None
        self.metrics = metrics or NoMetrics()
        self.in_flight = 0  # generation requests admitted and not yet answered (streams: until closed)
        self.playground = playground

    def authorize(self, headers: Mapping[str, str]) -> None:
        if self.api_key is None:
            return
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise Unauthorized("missing or invalid API key (Authorization: Bearer <key>)", code="invalid_api_key")

    def deadline(self, headers: Mapping[str, str]) -> float:
        raw = headers.get("x-request-timeout-seconds")
        if raw is None:
            return self.limits.request_timeout_s
        try:
            asked = float(raw)
        except ValueError:
            raise BadRequest("x-request-timeout-seconds must be a number of seconds") from None
        if not asked > 0:
            raise BadRequest("x-request-timeout-seconds must be positive")
        return min(asked, self.limits.request_timeout_s)

    # -- endpoints ----------------------------------------------------------------------------
    def models(self, headers: Mapping[str, str] = {}) -> Reply:
        try:
            self.authorize(headers)
        except PipelineError as e:
            return error_reply(e)
        return Reply(200, ModelList(data=[ModelCard(id=name) for name in self.pipelines]).model_dump())

    @staticmethod
    def _model_health(p: Pipeline) -> dict:
        return {"drafter_in_rotation": p.drafter is not None and p.health.healthy(),
                "drafter_stuck_jobs": p.health.stuck, "drafts_in_flight": p.drafts_in_flight,
                "router": {"policy": p.policy.kind, "observations": p.estimates.observed,
                           "estimates": p.estimates.snapshot()}}

    def health(self) -> Reply:
        """The default model's state at the top level; every model's under ``models``."""
        body = {"status": "ok", **self._model_health(self.pipeline), "requests_in_flight": self.in_flight}
        if len(self.pipelines) > 1:
            body["models"] = {name: self._model_health(p) for name, p in self.pipelines.items()}
        return Reply(200, body)

    async def chat(self, raw: bytes, headers: Mapping[str, str] = {}) -> Reply:
        return await self._handle(raw, headers, ChatCompletionRequest, chat=True)

    async def completions(self, raw: bytes, headers: Mapping[str, str] = {}) -> Reply:
        return await self._handle(raw, headers, CompletionRequest, chat=False)

    async def playground_run(self, raw: bytes, headers: Mapping[str, str] = {}) -> Reply:
        """A chat completion request, answered as the trace of its run (``pipeline/watch.py``):
        server-sent events, each named by its kind, ending with ``final`` (the chat completion
        ``/v1/chat/completions`` would have answered) or ``error``. Same admission, limits, key,
        routing and pipeline as a chat completion; ``stream`` is ignored."""
        if not self.playground:
            return playground_off()
        return await self._handle(raw, headers, ChatCompletionRequest, chat=True, watched=True)

    # -- shared handling ------------------------------------------------------------------------
    def parse(self, raw: bytes, model_cls):
        depth = json_depth(raw or b"")
        if depth > MAX_BODY_DEPTH:
            raise BadRequest(f"request body nests {depth} levels deep; the limit is {MAX_BODY_DEPTH}")
        try:
            data = json.loads(raw or b"")
        except ValueError as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            msg, param = _pydantic_message(e)
            raise BadRequest(msg, param=param) from None

    def pipeline_for(self, model: str) -> Pipeline:
        if model not in self.pipelines:
            raise ModelNotFound(f"model {model!r} does not exist; available: {list(self.pipelines)}",
                                param="model", code="model_not_found")
        return self.pipelines[model]

    def make_job(self, req, chat: bool, trace: dict[str, str] | None = None,
                 timeout_s: float | None = None) -> tuple[Job, RouteDecision]:
        pipeline = self.pipeline_for(req.model)
        limit = req.token_limit()
        if limit is None:
            limit = min(self.limits.default_max_tokens, self.limits.max_tokens)
        if limit > self.limits.max_tokens:
            raise BadRequest(f"max_tokens {limit} exceeds this deployment's limit of {self.limits.max_tokens}",
                             param="max_tokens")
        try:
            messages = tuple((m.role, m.text()) for m in req.messages) if chat else None
        except ValueError as e:
            raise BadRequest(str(e), param="messages") from None
        prompt_chars = sum(len(c) for _, c in messages) if messages else len(req.prompt)
        if prompt_chars > self.limits.max_prompt_chars:
            raise BadRequest(f"prompt of {prompt_chars} characters exceeds the limit of "
                             f"{self.limits.max_prompt_chars}", param="messages" if chat else "prompt")
        constraint = _constraint(req.response_format)
        if constraint is not None:
            try:
                self.registry.prepare(constraint)
            except ConstraintError as e:
                raise BadRequest(str(e), param="response_format") from None
        job = Job(messages=messages, prompt=None if chat else req.prompt, max_tokens=limit,
                  temperature=req.temperature, seed=req.seed, constraint=constraint,
                  request_id=uuid.uuid4().hex, trace=dict(trace or {}),
                  deadline=None if timeout_s is None else time.time() + timeout_s)
        shape = RequestShape(structured=constraint is not None, stream=req.stream,
                             temperature=req.temperature, requested=req.route, max_tokens=limit)
        return job, pipeline.route(shape, job.trace)

    async def _handle(self, raw: bytes, headers: Mapping[str, str], model_cls, chat: bool,
                      watched: bool = False) -> Reply:
        record = RequestRecord("chat" if chat else "text_completion", self.model_name, headers, self.metrics)
        admitted = False
        try:
            self.authorize(headers)
            if self.in_flight >= self.limits.max_in_flight:  # shed load now rather than queue without bound
                raise Overloaded(f"the server is at capacity ({self.limits.max_in_flight} requests in flight); "
                                 "retry shortly", retry_after=1.0, code="server_overloaded")
            self.in_flight += 1
            admitted = True
            if len(raw) > self.limits.max_body_bytes:
                raise PayloadTooLarge(f"request body of {len(raw)} bytes exceeds the limit of {self.limits.max_body_bytes}")
            timeout = self.deadline(headers)
            req = self.parse(raw, model_cls)
            if watched:
                req = req.model_copy(update={"stream": False})
            pipeline = self.pipeline_for(req.model)
            record.model_is(req.model)
            job, decision = self.make_job(req, chat, record.carrier, timeout)
            record.request(job, decision, req.stream)
            if watched or req.stream:
                slot = _Slot(self)
                if watched:
                    stream = self._watched(pipeline, req, job, decision, timeout, record, slot)
                else:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    stream = self._sse(pipeline, job, decision, req.stop_list(), chat, include_usage, timeout,
                                       record, slot)
                weakref.finalize(stream, slot.release)  # a stream never started still frees its slot
                admitted = False  # the stream holds the slot now
                return Reply(200, stream=stream, headers={"x-route": decision.header()})
            try:
                outcome = await asyncio.wait_for(pipeline.run(job, decision, req.stop_list(), record.stats),
                                                 timeout)
            except asyncio.TimeoutError:
                raise _past_deadline(timeout) from None
        except PipelineError as e:
            reply = error_reply(e)
            record.close(reply.status, error=e)
            return reply
        except BaseException as e:
            record.close(500, error=PipelineError(f"internal error ({type(e).__name__})"))
            raise
        finally:
            if admitted:
                self.in_flight -= 1
        body = _answer(req, outcome, chat)
        record.close(200, outcome.result, outcome.decision, body.id)
        return Reply(200, body.model_dump(), headers={"x-route": outcome.decision.header()})

    async def _watched(self, pipeline: Pipeline, req, job: Job, decision: RouteDecision, timeout: float,
                       record: RequestRecord, slot: "_Slot") -> AsyncIterator[bytes]:
        """The events of one watched run (``pipeline/watch.py``) as they happen; the run is
        cancelled when the reader goes away."""
        w = RunWatch()
        c = job.constraint
        yield _named("route", {"t": 0.0, "path": decision.path, "reason": decision.reason, "model": req.model,
                               "request_id": job.request_id, "constraint": None if c is None else str(c.kind),
                               "spec": None if c is None else c.spec})

        async def run() -> Outcome:
            with watching(w):
                return await pipeline.run(job, decision, req.stop_list(), record.stats)

        task = asyncio.ensure_future(asyncio.wait_for(run(), timeout))
        try:
            while True:
                event = asyncio.ensure_future(w.queue.get())
                await asyncio.wait({event, task}, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    break
                yield _named(*event.result())
            while not w.queue.empty():
                yield _named(*w.queue.get_nowait())
            try:
                outcome = task.result()
            except asyncio.TimeoutError:
                raise _past_deadline(timeout) from None
            body = _answer(req, outcome, True)
            record.close(200, outcome.result, outcome.decision, body.id)
            yield _named("final", {"t": w.elapsed(), **body.model_dump()})
        except PipelineError as e:
            record.close(e.status, error=e)
            yield _named("error", {"t": w.elapsed(), "status": e.status, **error_reply(e).body})
        except Exception as e:
            record.close(500, error=PipelineError(f"internal error ({type(e).__name__})"))
            yield _named("error", {"t": w.elapsed(), "status": 500, **error_reply(PipelineError("internal error")).body})
        finally:  # (a close here: the reader went away mid-run)
            w.close()
            task.cancel()
            record.close(499)
            slot.release()

    async def _sse(self, pipeline: Pipeline, job: Job, decision: RouteDecision, stops: list[str], chat: bool,
                   include_usage: bool, timeout: float, record: RequestRecord, slot: "_Slot"
                   ) -> AsyncIterator[bytes]:
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {"id": cid, "created": int(time.time()), "model": record.model,
                "route": RouteInfo(path=decision.path, reason=decision.reason)}

        def frame(delta: ChatDelta | None, text: str | None, finish: str | None, usage: Usage | None = None) -> bytes:
            if chat:
                choices = [] if delta is None else [ChatChunkChoice(delta=delta, finish_reason=finish)]
                chunk = ChatCompletionChunk(**head, choices=choices, usage=usage)
            else:
                choices = [] if text is None else [CompletionChunkChoice(text=text, finish_reason=finish)]
                chunk = CompletionChunk(**head, choices=choices, usage=usage)
            return _event(chunk.model_dump())

        try:
            if chat:
                yield frame(ChatDelta(role="assistant", content=""), None, None)
            final = None
            end = asyncio.get_running_loop().time() + timeout
            source = pipeline.stream(job, decision, stops, record.stats).__aiter__()
            while True:
                left = end - asyncio.get_running_loop().time()
                try:
                    chunk = await asyncio.wait_for(source.__anext__(), max(left, 0.001))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    await source.aclose()
                    raise DeadlineExceeded(f"stream exceeded the request deadline of {timeout:g} s",
                                           code="deadline_exceeded") from None
                if chunk.text:
                    record.first_chunk()
                    yield frame(ChatDelta(content=chunk.text), chunk.text, None)
                if chunk.result is not None:
                    final = chunk.result
            finish = "stop" if final is None or final.finished else "length"
            yield frame(ChatDelta(), "", finish)
            if include_usage and final is not None:
                yield frame(None, None, None, _usage(final))
            record.close(200, final, response_id=cid)
        except PipelineError as e:
            record.close(e.status, error=e)
            yield _event(error_reply(e).body)
        except Exception as e:
            record.close(500, error=PipelineError(f"internal error while streaming ({type(e).__name__})"))
            yield _event(error_reply(PipelineError("internal error while streaming")).body)
        finally:  # (a close here: the client went away mid-stream)
            record.close(499)
            slot.release()
        yield b"data: [DONE]\n\n"
