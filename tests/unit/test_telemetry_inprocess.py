"""Span layout and metric mapping in-process (the OTLP wire path is tested in tests/integration)."""

import asyncio
import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline import telemetry
from pipeline.assemble import local_pipeline
from pipeline.gateway import Gateway, Limits
from pipeline.interfaces import Stats
from pipeline.telemetry import MemoryMetrics, RequestObservation, metric_events

PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"


@pytest.fixture(scope="module")
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        pytest.skip("another tracer provider was installed first in this process")
    return exporter


@pytest.fixture(scope="module")
def gateway(drafter, verifier):
    pipe = local_pipeline(drafter, verifier)
    return Gateway(pipe, "dgserve-tiny", Limits(max_tokens=128, default_max_tokens=32), metrics=MemoryMetrics())


def test_exporter_selection_follows_the_otel_variables(monkeypatch):
    for k in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    assert telemetry._exporters_in_use() == "none"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert telemetry._exporters_in_use() == "otlp"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, otlp")
    assert telemetry._exporters_in_use() == "console,otlp"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert telemetry._exporters_in_use() == "none"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        telemetry._exporters_in_use()


def test_metric_events_map_a_request_to_every_metric():
    obs = RequestObservation("diffusion", 200, True, True, 1.5, 0.2,
                             Stats(draft_valid=False, repair_used=True, canvas_steps=(3, 5),
                                   tokens_per_forward=4.0, accepted=(6, 2), drafter_overloaded=True,
                                   drafts=2, verifier_forwards_per_token=0.375), model="dgserve-tiny")
    ev = metric_events(obs)
    names = [n for n, _, _ in ev]
    assert ("dgserve_requests", 1, {"model": "dgserve-tiny", "route": "diffusion", "status": "200", "stream": "true"}) in ev
    assert ("dgserve_draft_validations", 1, {"route": "diffusion", "result": "invalid"}) in ev
    assert ("dgserve_drafter_fallbacks", 1, {"reason": "overloaded"}) in ev
    assert [v for n, v, _ in ev if n == "dgserve_denoising_steps_per_canvas"] == [3, 5]
    assert [v for n, v, _ in ev if n == "dgserve_accepted_draft_length"] == [6, 2]
    assert ("dgserve_verify_drafts_per_request", 2, {}) in ev
    assert ("dgserve_verifier_forwards_per_token", 0.375, {}) in ev
    assert ("dgserve_time_to_first_chunk_seconds", 0.2, {"route": "diffusion"}) in ev
    assert "dgserve_repairs" in names and "dgserve_structured_fallbacks" not in names
    # every event names a declared metric with exactly its declared tags
    specs = {m.name: m for m in telemetry.METRICS}
    assert all(set(tags) == set(specs[n].tags) for n, _, tags in ev)
    # a request refused before routing counts as a request, nothing else
    refused = metric_events(RequestObservation("none", 401, False, True, 0.001))
    assert [n for n, _, _ in refused] == ["dgserve_requests", "dgserve_request_duration_seconds"]


def test_failed_structured_request_leaves_one_trace_and_its_metrics(gateway, spans):
    spans.clear()
    tp_trace, tp_span = "ab" * 16, "cd" * 8
    body = {"model": "dgserve-tiny", "max_tokens": 96, "route": "diffusion",
            "messages": [{"role": "user", "content": "Solve " + PUZZLE}],
            "response_format": {"type": "sudoku", "sudoku": {"puzzle": PUZZLE}}}
    reply = asyncio.run(gateway.chat(json.dumps(body).encode(), {"traceparent": f"00-{tp_trace}-{tp_span}-01"}))
    assert reply.status == 422
    got = spans.get_finished_spans()
    assert {s.context.trace_id for s in got} == {int(tp_trace, 16)}
    by = {}
    for s in got:
        by.setdefault(s.name, []).append(s)
    [root] = by["chat dgserve-tiny"]
    assert root.parent.span_id == int(tp_span, 16) and root.kind == trace.SpanKind.SERVER
    assert root.status.status_code == trace.StatusCode.ERROR
    assert root.attributes["error.type"] == "validation_failed"
    for name, parent in [("dgserve.draft", root), ("drafter.draft", by["dgserve.draft"][0]),
                         ("dgserve.repair", root), ("ar.repair", by["dgserve.repair"][0]),
                         ("dgserve.fallback", root), ("ar.generate", by["dgserve.fallback"][0])]:
        [s] = by[name]
        assert s.parent.span_id == parent.context.span_id, name
    assert len(by["validator.validate"]) == 3
    events = gateway.metrics.events
    assert ("dgserve_requests", 1, {"model": "dgserve-tiny", "route": "diffusion", "status": "422", "stream": "false"}) in events
    assert ("dgserve_repairs", 1, {}) in events and ("dgserve_structured_fallbacks", 1, {}) in events
    assert ("dgserve_draft_validations", 1, {"route": "diffusion", "result": "invalid"}) in events


def test_streamed_draft_reports_time_to_first_chunk(gateway, spans):
    gateway.metrics.events.clear()
    body = {"model": "dgserve-tiny", "max_tokens": 24, "route": "diffusion", "stream": True,
            "messages": [{"role": "user", "content": "Describe Oslo in a few words."}]}

    async def drain():
        reply = await gateway.chat(json.dumps(body).encode(), {})
        return [f async for f in reply.stream]

    frames = asyncio.run(drain())
    assert frames[-1] == b"data: [DONE]\n\n"
    events = gateway.metrics.events
    [ttfc] = [v for n, v, _ in events if n == "dgserve_time_to_first_chunk_seconds"]
    [total] = [v for n, v, _ in events if n == "dgserve_request_duration_seconds"]
    assert 0 < ttfc <= total
    assert [v for n, v, _ in events if n == "dgserve_denoising_steps_per_canvas"]
    stream_spans = [s for s in spans.get_finished_spans() if s.name == "dgserve.draft_stream"]
    assert stream_spans and stream_spans[-1].attributes["dgserve.canvases"] >= 1
