"""Traces and metrics of the real app: spans over OTLP/HTTP into a protobuf-decoding receiver,
Ray Serve metrics scraped from the Prometheus endpoint."""

import re
import secrets
import time

import requests

from tests.otlp_receiver import ReceivedSpan

MODEL = "dgserve-tiny"
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
SERVER, CLIENT = 2, 3  # OTLP SpanKind values


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def post(app_url, body, tp, path="/v1/chat/completions"):
    return requests.post(app_url + path, json={"model": MODEL, **body}, timeout=120,
                         headers={"traceparent": tp})


def by_name(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def children(spans, parent):
    return [s for s in spans if s.parent_id == parent.span_id]


def chain(spans, span) -> list[ReceivedSpan]:
    """``span``'s ancestors in the trace, nearest first (the first foreign parent ends it)."""
    ids = {s.span_id: s for s in spans}
    out = []
    while span.parent_id in ids:
        span = ids[span.parent_id]
        out.append(span)
    return out


def assert_request_root(spans, root, caller_span):
    """The request span hangs off the caller's span, directly or under the HTTP server span."""
    ancestors = chain(spans, root)
    top = ancestors[-1] if ancestors else root
    assert top.parent_id == caller_span and top.kind == SERVER, (top.name, top.parent_id)
    assert all(a.name.startswith(("POST ", "fastapi.")) for a in ancestors), [a.name for a in ancestors]


def test_structured_request_traces_every_stage_under_the_callers_trace(app_url, otlp):
    """A sudoku answer the drafter cannot give: draft -> validate -> repair -> validate -> fallback
    -> validate -> 422, each stage a span, each replica's spans under the caller's trace."""
    tp, trace_id, caller_span = traceparent()
    r = post(app_url, {"max_tokens": 96, "route": "diffusion", "seed": 0,  # a draft from fixed noise
                       "messages": [{"role": "user", "content": "Solve " + PUZZLE}],
                       "response_format": {"type": "sudoku", "sudoku": {"puzzle": PUZZLE}}}, tp)
    assert r.status_code == 422, r.text
    want = {"chat dgserve-tiny", "dgserve.route", "dgserve.draft", "drafter.draft", "drafter.canvas",
            "dgserve.validate", "validator.validate", "dgserve.repair", "ar.repair", "dgserve.fallback",
            "ar.generate"}
    spans = otlp.wait_for(trace_id, want)
    names = by_name(spans)
    assert want <= set(names), sorted(names)
    assert all(s.trace_id == trace_id for s in spans)

    [root] = names["chat dgserve-tiny"]
    assert_request_root(spans, root, caller_span)
    assert root.attributes["gen_ai.request.model"] == MODEL
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["dgserve.route"] == "diffusion"
    assert root.attributes["http.response.status_code"] == 422
    assert root.attributes["dgserve.repair_used"] is True and root.attributes["dgserve.draft_valid"] is False
    assert root.resource["dgserve.component"] == "ingress" and root.resource["service.name"] == "dgserve"

    # the ingress stages are children of the request span, each replica's span a child of its stage
    for stage, remote, component in [("dgserve.draft", "drafter.draft", "drafter"),
                                     ("dgserve.repair", "ar.repair", "drafter"),
                                     ("dgserve.fallback", "ar.generate", "drafter")]:
        [s] = names[stage]
        assert s.parent_id == root.span_id and s.kind == CLIENT
        [r_] = children(spans, s)
        assert r_.name == remote and r_.resource["dgserve.component"] == component
    validations = names["dgserve.validate"]
    assert len(validations) == 3 and all(v.parent_id == root.span_id for v in validations)
    remote_checks = names["validator.validate"]
    assert {v.parent_id for v in remote_checks} == {v.span_id for v in validations}
    assert all(v.attributes["dgserve.validation.ok"] is False for v in remote_checks)
    assert all(v.resource["dgserve.component"] == "validator" for v in remote_checks)
    assert names["dgserve.route"][0].parent_id == root.span_id

    [draft] = names["drafter.draft"]
    canvases = names["drafter.canvas"]
    assert all(c.parent_id == draft.span_id for c in canvases)
    assert len(canvases) == draft.attributes["dgserve.canvases"] >= 1
    assert sum(c.attributes["dgserve.denoising_steps"] for c in canvases) == draft.attributes["dgserve.denoising_steps"]
    assert draft.attributes["gen_ai.usage.output_tokens"] == sum(c.attributes["dgserve.tokens"] for c in canvases)
    assert draft.start_ns <= canvases[0].start_ns and canvases[-1].end_ns <= draft.end_ns
    # the stage spans nest in time inside the request span
    for s in spans:
        if s.name.startswith(("dgserve.", "drafter.", "validator.", "ar.")):
            assert root.start_ns <= s.start_ns <= s.end_ns <= root.end_ns + 1_000_000, s.name


def test_verify_route_trace_has_a_span_per_round(app_url, otlp):
    tp, trace_id, _ = traceparent()
    r = post(app_url, {"max_tokens": 40, "temperature": 0, "route": "verify",
                       "messages": [{"role": "user", "content": "Describe Lyon in a few words."}]}, tp)
    assert r.status_code == 200, r.text
    spans = otlp.wait_for(trace_id, {"chat dgserve-tiny", "dgserve.speculate", "drafter.speculate", "speculative.round"})
    names = by_name(spans)
    [root], [stage], [spec] = names["chat dgserve-tiny"], names["dgserve.speculate"], names["drafter.speculate"]
    assert stage.parent_id == root.span_id and spec.parent_id == stage.span_id
    rounds = names["speculative.round"]
    assert len(rounds) == spec.attributes["dgserve.drafts"] == r.json()["stats"]["drafts"]
    assert sum(x.attributes["dgserve.accepted_length"] for x in rounds) >= r.json()["usage"]["completion_tokens"]
    assert root.attributes["gen_ai.usage.output_tokens"] == r.json()["usage"]["completion_tokens"]
    assert root.attributes["gen_ai.response.finish_reasons"] == [r.json()["choices"][0]["finish_reason"]]


def test_streamed_ar_request_is_one_trace(app_url, otlp):
    tp, trace_id, caller = traceparent()
    with requests.post(app_url + "/v1/completions", stream=True, timeout=120, headers={"traceparent": tp},
                       json={"model": MODEL, "prompt": "Paris is", "max_tokens": 12, "stream": True,
                             "route": "ar"}) as r:
        assert r.status_code == 200
        body = b"".join(r.iter_content())
    assert b"[DONE]" in body
    spans = otlp.wait_for(trace_id, {"text_completion dgserve-tiny", "dgserve.stream", "ar.stream"})
    names = by_name(spans)
    [root], [stage], [ar] = names["text_completion dgserve-tiny"], names["dgserve.stream"], names["ar.stream"]
    assert_request_root(spans, root, caller)
    assert stage.parent_id == root.span_id and ar.parent_id == stage.span_id
    assert root.attributes["dgserve.stream"] is True and root.attributes["dgserve.route"] == "ar"


def test_request_without_traceparent_starts_its_own_trace(app_url, otlp):
    r = requests.post(app_url + "/v1/completions", timeout=120,
                      json={"model": MODEL, "prompt": "Rome is", "max_tokens": 8, "route": "ar"})
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    mine: list[ReceivedSpan] = []
    while time.monotonic() < deadline and not mine:
        with otlp.lock:
            mine = [s for s in otlp.spans if s.attributes.get("gen_ai.response.id") == r.json()["id"]]
        time.sleep(0.2)
    assert len(mine) == 1, "no request span carries the response id"
    spans = otlp.wait_for(mine[0].trace_id, {"dgserve.generate", "ar.generate"})
    top = (chain(spans, mine[0]) or [mine[0]])[-1]
    assert top.parent_id == "" and top.kind == SERVER
    assert {"dgserve.generate", "ar.generate"} <= {s.name for s in spans}


def _scrape(metrics_url: str, names: set[str], timeout: float = 40.0) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        try:
            text = requests.get(metrics_url, timeout=5).text
        except requests.ConnectionError:
            text = ""
        if all(f"ray_{n}" in text for n in names):
            return text
        time.sleep(1)
    return text


def _samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        m = re.match(rf"^ray_{name}(?:\{{(.*)\}})? ([0-9.eE+-]+|NaN)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def test_metrics_endpoint_reports_every_pipeline_metric(app_url, metrics_url):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    bodies = [
        {"max_tokens": 48, "route": "diffusion", "messages": [{"role": "user", "content": "Name a city as JSON."}],
         "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": schema}}},
        {"max_tokens": 40, "temperature": 0, "route": "verify",
         "messages": [{"role": "user", "content": "Describe Oslo in a few words."}]},
        {"max_tokens": 24, "route": "diffusion", "stream": True,
         "messages": [{"role": "user", "content": "Describe Bern in a few words."}]},
        {"max_tokens": 96, "route": "diffusion", "messages": [{"role": "user", "content": "Solve " + PUZZLE}],
         "response_format": {"type": "sudoku", "sudoku": {"puzzle": PUZZLE}}},
        # routed by the router (auto): its predictions per path become gauges
        {"max_tokens": 32, "messages": [{"role": "user", "content": "Describe Rome in a few words."}]},
    ]
    # The cluster is shared with the other integration tests (some kill replicas, whose series Ray then
    # reports inconsistently), so the histogram means below are taken over this test's requests:
    # the difference of a scrape before them and one after.
    before = requests.get(metrics_url, timeout=5).text
    statuses = [requests.post(app_url + "/v1/chat/completions", json={"model": MODEL, **b}, timeout=120).status_code
                for b in bodies]
    assert statuses == [200, 200, 200, 422, 200]
    wanted = {"dgserve_requests_total", "dgserve_request_duration_seconds_bucket", "dgserve_structured_requests_total",
              "dgserve_draft_validations_total", "dgserve_repairs_total", "dgserve_structured_fallbacks_total",
              "dgserve_denoising_steps_per_canvas_bucket", "dgserve_tokens_per_forward_bucket",
              "dgserve_accepted_draft_length_bucket", "dgserve_time_to_first_chunk_seconds_bucket",
              "dgserve_verify_drafts_per_request_bucket", "dgserve_verifier_forwards_per_token_bucket",
              "dgserve_route_predicted_seconds", "dgserve_route_agreement"}
    # histograms and the plausible range of their means
    bounds = [("dgserve_denoising_steps_per_canvas", 1, 64), ("dgserve_tokens_per_forward", 0.01, 64),
              ("dgserve_accepted_draft_length", 1, 64), ("dgserve_time_to_first_chunk_seconds", 0, 60),
              ("dgserve_verify_drafts_per_request", 1, 64), ("dgserve_verifier_forwards_per_token", 0.01, 1.5),
              ("dgserve_request_duration_seconds", 0.001, 120)]

    def total(name, _text=None, **labels):
        return sum(v for lab, v in _samples(text if _text is None else _text, name)
                   if all(lab.get(k) == w for k, w in labels.items()))

    deadline = time.monotonic() + 40
    while True:  # until every histogram shows this test's observations (Ray exports periodically)
        text = _scrape(metrics_url, wanted)
        fresh = all(total(h + "_count") > total(h + "_count", before) for h, _, _ in bounds)
        if fresh or time.monotonic() > deadline:
            break
        time.sleep(1)
    missing = [n for n in wanted if not _samples(text, n)]
    assert not missing, missing

    assert total("dgserve_requests_total", route="verify", status="200") >= 1
    assert total("dgserve_requests_total", route="diffusion", status="422") >= 1
    assert total("dgserve_requests_total", stream="true") >= 1
    assert total("dgserve_structured_requests_total") >= 2
    assert total("dgserve_draft_validations_total", result="invalid") >= 1
    assert total("dgserve_repairs_total") >= 1 and total("dgserve_structured_fallbacks_total") >= 1
    assert total("dgserve_structured_requests_total") >= total("dgserve_draft_validations_total")
    # the router's estimates for the prose shape: every path predicted, AR the agreement reference
    predicted = {lab["path"]: v for lab, v in _samples(text, "dgserve_route_predicted_seconds")
                 if lab.get("shape") == "prose/whole/<=64"}
    assert set(predicted) == {"ar", "diffusion", "verify"} and all(0 < v < 60 for v in predicted.values()), predicted
    assert {lab["path"]: v for lab, v in _samples(text, "dgserve_route_agreement")
            if lab.get("shape") == "prose/whole/<=64"}.get("ar") == 1.0
    # histograms: counts positive, means plausible
    for name, lo, hi in bounds:
        count = total(name + "_count") - total(name + "_count", before)
        s = total(name + "_sum") - total(name + "_sum", before)
        assert count >= 1, name
        assert lo <= s / count <= hi, (name, s, count)
