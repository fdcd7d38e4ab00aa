"""Tracing (OpenTelemetry) and the metrics each request produces.

One trace per request: the ingress opens a SERVER span (the parent is the caller's W3C
``traceparent`` when it sends one), and every stage below it opens its own span with the parent
handed over explicitly in ``Job.trace`` (a W3C carrier dict), so context crosses Ray Serve
deployment calls, worker threads and streams without relying on context variables::

    chat dgserve-tiny                       ingress  (gen_ai.* request/usage, dgserve.route ...)
    ├── dgserve.route                       ingress  (route, reason, live load)
    ├── dgserve.draft                       ingress  (client side of the drafter call)
    │   └── drafter.draft                   drafter  (batch size, steps, tokens per forward)
    │       ├── drafter.canvas              drafter  (one per committed canvas: steps, tokens)
    │       └── ...
    ├── dgserve.validate                    ingress
    │   └── validator.validate              validator (ok, error count, first error)
    └── dgserve.repair                      ingress
        └── ar.repair                       drafter or verifier (reused draft tokens)

Export is configured the standard way, from the OTel SDK environment variables (see
:func:`configure_tracing`). With nothing set, no exporter runs and spans cost next to nothing.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .interfaces import Stats

TRACER = "dgserve"
_propagator = TraceContextTextMapPropagator()
_configured = False

# OpenTelemetry GenAI semantic conventions
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_SEED = "gen_ai.request.seed"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_OUTPUT_TYPE = "gen_ai.output.type"


def configure_tracing(component: str) -> str:
    """Install this process's tracer provider once; returns the exporters in use (",".join).

    Environment (the OTel SDK's own variables):

    * ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console``, ``none`` or a comma list. Unset: ``otlp``
      when an OTLP endpoint is set, else ``none``.
    * ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``, headers, timeout:
      read by the OTLP exporter. ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` must be ``http/protobuf``.
    * ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: read by the SDK (default: parent-based
      always-on, so a caller's sampled ``traceparent`` is honoured).
    * ``OTEL_SERVICE_NAME`` (default ``dgserve``), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*``.

    ``component`` (ingress, drafter, verifier, validator) becomes the ``dgserve.component``
    resource attribute. Unknown exporters or protocols raise ``ValueError`` at start-up.
    """
    global _configured
    if _configured:
        return _exporters_in_use()
    names = _exporters_in_use()
    if names == "none":
        _configured = True
        return names
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attrs = {"dgserve.component": component}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = "dgserve"
    provider = TracerProvider(resource=Resource.create(attrs))
    for name in names.split(","):
        if name == "otlp":
            protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            if protocol != "http/protobuf":
                raise ValueError(f"OTLP protocol {protocol!r} is not supported; use http/protobuf")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return names


def _exporters_in_use() -> str:
    raw = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        has_endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        return "otlp" if has_endpoint else "none"
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in ("otlp", "console", "none")]
    if unknown:
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter(s) {unknown}; use otlp, console or none")
    names = [n for n in names if n != "none"]
    return ",".join(dict.fromkeys(names)) or "none"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def parent(carrier: Mapping[str, str] | None):
    """The context a W3C carrier (``traceparent``/``tracestate``) names; empty -> a new trace."""
    return _propagator.extract(dict(carrier or {}))


def carrier_of(span: trace.Span) -> dict[str, str]:
    """A W3C carrier naming ``span`` as the parent of what is started with it."""
    out: dict[str, str] = {}
    _propagator.inject(out, context=trace.set_span_in_context(span))
    return out


def attributes(span: trace.Span, values: Mapping[str, Any], prefix: str = "") -> None:
    """Set the scalar (and homogeneous list) values of ``values`` as span attributes."""
    if not span.is_recording():
        return
    for k, v in values.items():
        if isinstance(v, (bool, int, float, str)):
            span.set_attribute(prefix + k, v)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) for x in v):
            span.set_attribute(prefix + k, list(v))


def fail(span: trace.Span, err: BaseException) -> None:
    span.record_exception(err)
    span.set_status(Status(StatusCode.ERROR, type(err).__name__))
    span.set_attribute("error.type", getattr(err, "code", None) or type(err).__name__)


@contextmanager
def span(name: str, carrier: Mapping[str, str] | None, kind: SpanKind = SpanKind.INTERNAL,
         attrs: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
    """A span whose parent is ``carrier``'s; errors are recorded on it and re-raised."""
    s = tracer().start_span(name, context=parent(carrier), kind=kind)
    attributes(s, attrs or {})
    try:
        yield s
    except Exception as e:
        fail(s, e)
        raise
    finally:
        s.end()


def start_request_span(name: str, headers: Mapping[str, str]) -> trace.Span:
    """The span of one request at the ingress. Under an HTTP server span the web framework already
    opened (FastAPI traces requests itself once a tracer provider is set) it is that span's child;
    otherwise it is the SERVER span, its parent the caller's W3C ``traceparent`` header."""
    if trace.get_current_span().get_span_context().is_valid:
        return tracer().start_span(name)
    return tracer().start_span(name, context=parent(headers), kind=SpanKind.SERVER)


def now_ns() -> int:
    return time.time_ns()


def record_draft(carrier: Mapping[str, str] | None, start_ns: int, draft, batch_size: int,
                 name: str = "drafter.draft") -> None:
    """Spans of a finished draft (:class:`models.drafter.Draft`), laid out after the fact from its
    canvas commit times: one ``drafter.draft`` span and a ``drafter.canvas`` child per canvas."""
    t = tracer()
    end = start_ns + int(draft.total_s * 1e9)
    s = t.start_span(name, context=parent(carrier), start_time=start_ns)
    attributes(s, {
        GEN_AI_OUTPUT_TOKENS: len(draft.token_ids), "dgserve.batch_size": batch_size,
        "dgserve.canvases": len(draft.steps_per_canvas), "dgserve.denoising_steps": sum(draft.steps_per_canvas),
        "dgserve.tokens_per_forward": round(draft.tokens_per_forward, 3), "dgserve.finished": draft.finished,
    })
    ctx = trace.set_span_in_context(s)
    prev = start_ns
    for i, (steps, end_s) in enumerate(zip(draft.steps_per_canvas, draft.canvas_ends_s)):
        tokens = draft.tokens_per_canvas[i] if i < len(draft.tokens_per_canvas) else 0
        stop = start_ns + int(end_s * 1e9)
        c = t.start_span("drafter.canvas", context=ctx, start_time=prev)
        attributes(c, {"dgserve.canvas_index": i, "dgserve.denoising_steps": steps, "dgserve.tokens": tokens,
                       "dgserve.tokens_per_forward": round(tokens / max(1, steps), 3)})
        c.end(end_time=stop)
        prev = stop
    s.end(end_time=max(end, prev))


def record_speculation(carrier: Mapping[str, str] | None, start_ns: int, result) -> None:
    """Spans of a finished speculative decode (:class:`models.speculative.SpeculativeResult`):
    ``drafter.speculate`` with a ``speculative.round`` child per draft-and-verify round."""
    t = tracer()
    s = t.start_span("drafter.speculate", context=parent(carrier), start_time=start_ns)
    attributes(s, {
        GEN_AI_OUTPUT_TOKENS: len(result.token_ids), "dgserve.drafts": result.drafts,
        "dgserve.mean_accepted": round(result.mean_accepted, 3), "dgserve.verifier_forwards": result.verifier_forwards,
        "dgserve.denoising_steps": result.denoising_steps,
    })
    ctx = trace.set_span_in_context(s)
    prev = start_ns
    for i, (acc, end_s) in enumerate(zip(result.accepted, result.round_ends_s)):
        stop = start_ns + int(end_s * 1e9)
        r = t.start_span("speculative.round", context=ctx, start_time=prev)
        steps = result.round_steps[i] if i < len(result.round_steps) else 0
        attributes(r, {"dgserve.round": i, "dgserve.denoising_steps": steps, "dgserve.accepted_length": acc})
        r.end(end_time=stop)
        prev = stop
    s.end(end_time=max(prev, start_ns + int(result.total_s * 1e9)))


# -- metrics -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: str  # "counter" | "histogram" | "gauge"
    description: str
    tags: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()


_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("dgserve_requests", "counter", "Requests answered, by model, route, HTTP status and streaming",
               ("model", "route", "status", "stream")),
    MetricSpec("dgserve_drafter_fallbacks", "counter",
               "Drafter requests served by AR instead (reason: overloaded or error)", ("reason",)),
    MetricSpec("dgserve_structured_requests", "counter", "Requests with a response_format constraint",
               ("model", "route")),
    MetricSpec("dgserve_draft_validations", "counter",
               "First answers of structured requests checked by the validator (result: valid|invalid)",
               ("route", "result")),
    MetricSpec("dgserve_repairs", "counter", "Structured answers repaired by constrained AR", ()),
    MetricSpec("dgserve_structured_fallbacks", "counter",
               "Structured answers replaced by a from-scratch constrained AR answer", ()),
    MetricSpec("dgserve_structured_rejections", "counter",
               "Structured requests answered 422: no valid answer, by cause (pipeline/rejections.py)", ("cause",)),
    MetricSpec("dgserve_denoising_steps_per_canvas", "histogram", "Decoder forwards per committed canvas",
               (), (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)),
    MetricSpec("dgserve_tokens_per_forward", "histogram", "Draft tokens per decoder forward, per request",
               ("route",), (0.5, 1, 2, 4, 8, 16, 32, 64)),
    MetricSpec("dgserve_accepted_draft_length", "histogram",
               "Tokens accepted per verification round (verify route)", (), (1, 2, 4, 8, 16, 32, 64, 128, 256)),
    MetricSpec("dgserve_verify_drafts_per_request", "histogram",
               "Draft-and-verify rounds per verify-route request", (), (1, 2, 4, 8, 16, 32, 64, 128)),
    MetricSpec("dgserve_verifier_forwards_per_token", "histogram",
               "Verifier forwards per output token on the verify route (AR alone: 1)", (),
               (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)),
    MetricSpec("dgserve_time_to_first_chunk_seconds", "histogram",
               "Time from request to the first streamed text chunk", ("route",), _SECONDS),
    MetricSpec("dgserve_request_duration_seconds", "histogram",
               "Time from request to the final answer", ("model", "route", "stream"), _SECONDS),
    MetricSpec("dgserve_route_predicted_seconds", "gauge",
               "The router's predicted seconds to a valid answer per path and request shape, at the last "
               "request's load", ("path", "shape")),
    MetricSpec("dgserve_route_agreement", "gauge",
               "Shadow-verified share of a path's answers AR's greedy agrees with, per request shape",
               ("path", "shape")),
)


@dataclass(frozen=True)
class RequestObservation:
    """What one finished request tells the metrics."""

    route: str  # the path that served it ("diffusion" | "verify" | "ar"), "none" before routing
    status: int
    stream: bool
    structured: bool
    total_s: float
    first_chunk_s: float | None = None  # streaming only
    stats: Stats = field(default_factory=Stats)
    shape: str = ""  # the request shape the router read estimates for ("" : none read)
    predicted: tuple[tuple[str, float, float | None], ...] = ()  # the router's (path, seconds, agreement)
    model: str = ""  # the model the request named


def metric_events(obs: RequestObservation) -> list[tuple[str, float, dict[str, str]]]:
    """The (metric name, value, tags) updates one request makes: counters by 1, histograms by the
    observed value. Pure, so the mapping is unit-tested without a metrics backend."""
    st = obs.stats
    ev: list[tuple[str, float, dict[str, str]]] = [
        ("dgserve_requests", 1, {"model": obs.model, "route": obs.route, "status": str(obs.status),
                                 "stream": str(obs.stream).lower()}),
        ("dgserve_request_duration_seconds", obs.total_s, {"model": obs.model, "route": obs.route,
                                                           "stream": str(obs.stream).lower()}),
    ]
    if obs.first_chunk_s is not None:
        ev.append(("dgserve_time_to_first_chunk_seconds", obs.first_chunk_s, {"route": obs.route}))
    if st.drafter_overloaded:
        ev.append(("dgserve_drafter_fallbacks", 1, {"reason": "overloaded"}))
    if st.drafter_error:
        ev.append(("dgserve_drafter_fallbacks", 1, {"reason": "error"}))
    if obs.structured and obs.route != "none":
        ev.append(("dgserve_structured_requests", 1, {"model": obs.model, "route": obs.route}))
        if st.draft_valid is not None:
            result = "valid" if st.draft_valid else "invalid"
            ev.append(("dgserve_draft_validations", 1, {"route": obs.route, "result": result}))
    if st.repair_used:
        ev.append(("dgserve_repairs", 1, {}))
    if st.fallback_used:
        ev.append(("dgserve_structured_fallbacks", 1, {}))
    if st.rejection_cause is not None:
        ev.append(("dgserve_structured_rejections", 1, {"cause": st.rejection_cause}))
    for steps in st.canvas_steps or ():
        ev.append(("dgserve_denoising_steps_per_canvas", steps, {}))
    if st.tokens_per_forward is not None:
        ev.append(("dgserve_tokens_per_forward", st.tokens_per_forward, {"route": obs.route}))
    for acc in st.accepted or ():
        ev.append(("dgserve_accepted_draft_length", acc, {}))
    if st.drafts is not None:
        ev.append(("dgserve_verify_drafts_per_request", st.drafts, {}))
    if st.verifier_forwards_per_token is not None:
        ev.append(("dgserve_verifier_forwards_per_token", st.verifier_forwards_per_token, {}))
    for path, seconds, agreement in obs.predicted:
        ev.append(("dgserve_route_predicted_seconds", seconds, {"path": path, "shape": obs.shape}))
        if agreement is not None:
            ev.append(("dgserve_route_agreement", agreement, {"path": path, "shape": obs.shape}))
    return ev


class Metrics(Protocol):
    def observe(self, obs: RequestObservation) -> None: ...


class NoMetrics:
    def observe(self, obs: RequestObservation) -> None:
        pass


class MemoryMetrics:
    """Keeps the events (for in-process use and tests)."""

    def __init__(self):
        self.events: list[tuple[str, float, dict[str, str]]] = []

    def observe(self, obs: RequestObservation) -> None:
        self.events.extend(metric_events(obs))
