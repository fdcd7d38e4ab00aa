"""Print the span tree of one request, as a tracing backend (Jaeger, Tempo) would show it.

``python -m bench.trace_tree [--kind json|sudoku|verify]`` runs the request through the in-process
gateway over the committed tiny checkpoint, with spans kept in memory, and prints each span with
its duration and the pipeline's attributes. The same spans, over OTLP, are what the deployed app
exports (tests/integration/test_telemetry.py checks that path on the wire).
"""

from __future__ import annotations

import argparse
import asyncio
import json

PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
SHOWN = ("gen_ai.", "dgserve.route", "dgserve.canvases", "dgserve.denoising_steps", "dgserve.tokens",
         "dgserve.batch_size", "dgserve.validation.ok", "dgserve.validation.errors", "dgserve.repair",
         "dgserve.draft_valid", "dgserve.fallback_used", "dgserve.accepted_length", "dgserve.drafts",
         "dgserve.mean_accepted", "dgserve.canvas_index", "http.response.status_code", "error.type",
         "dgserve.constrained", "dgserve.repair_reused_tokens")


def body(kind: str) -> dict:
    msg = {"json": "Extract the city as JSON: 'We met in Oslo last May.'", "sudoku": "Solve " + PUZZLE,
           "verify": "Describe Lyon in a few words."}[kind]
    b = {"model": "dgserve-tiny", "max_tokens": 96, "seed": 3, "messages": [{"role": "user", "content": msg}]}
    if kind == "json":
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
            "additionalProperties": False}}}
    elif kind == "sudoku":
        b["response_format"] = {"type": "sudoku", "sudoku": {"puzzle": PUZZLE}}
    else:
        b.update(route="verify", temperature=0, max_tokens=48)
    return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["json", "sudoku", "verify"], default="json")
    args = ap.parse_args()

    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    from models.drafter import DiffusionDrafter
    from models.verifier import ARVerifier
    from pipeline.assemble import local_pipeline
    from pipeline.gateway import Gateway

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    drafter = DiffusionDrafter.from_pretrained(None, "cpu", "float32")
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    pipe = local_pipeline(drafter, ar)
    gw = Gateway(pipe, "dgserve-tiny")
    reply = asyncio.run(gw.chat(json.dumps(body(args.kind)).encode(),
                                {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}))
    print(f"HTTP {reply.status}")
    spans = exporter.get_finished_spans()
    kids: dict = {}
    for s in spans:
        kids.setdefault(s.parent.span_id if s.parent else None, []).append(s)
    ids = {s.context.span_id for s in spans}
    roots = [s for s in spans if s.parent is None or s.parent.span_id not in ids]

    def show(s, depth):
        ms = (s.end_time - s.start_time) / 1e6
        attrs = {k: v for k, v in s.attributes.items() if k.startswith(SHOWN)}
        text = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in attrs.items())
        print(f"{'  ' * depth}{s.name:<{34 - 2 * depth}} {ms:8.1f} ms  {text}")
        for c in sorted(kids.get(s.context.span_id, []), key=lambda x: x.start_time):
            show(c, depth + 1)

    for r in roots:
        show(r, 0)


if __name__ == "__main__":
    main()
