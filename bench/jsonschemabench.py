"""Structured-output coverage on JSONSchemaBench schemas, through the full pipeline.

``python -m bench.jsonschemabench --set ../shared/data/jsonschemabench/Glaiveai2K.jsonl --json``
(``--limit N``; ``--url http://127.0.0.1:8000`` to go through a running server) sends one chat
request per schema with ``response_format: json_schema`` and prints:

* ``n``; ``valid``: answers that validate with jsonschema (checked here, independently);
* ``rejected``: clear 4xx answers with a reason (schema refused, no valid answer within budget),
  and ``rejections``: their count per cause (``pipeline/rejections.py``);
* ``invalid_success``: answers marked successful that fail validation (must be 0);
* ``coverage`` = valid / n; ``median_latency_s``; ``repair_used``/``fallback_used`` counts and the
  routes taken.

In process, requests are routed as the app routes them: the measured router is calibrated first,
as the ingress does at start-up (``--no-calibrate``: the static rules, every structured request
to the drafter). ``--dump FILE`` writes one line per schema (status, latency, route, cause, stage
timings) for finding where the rejections and the seconds go.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time
from pathlib import Path

from jsonschema.validators import validator_for

from bench.workload import SCHEMA_PROMPT as PROMPT  # noqa: E402
from pipeline.rejections import cause_of_refusal


def request(schema: dict, max_tokens: int) -> dict:
    return {"model": "dgserve-tiny", "max_tokens": max_tokens, "temperature": 0, "seed": 0,
            "messages": [{"role": "user", "content": PROMPT.format(schema=json.dumps(schema, separators=(",", ":")))}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}


def in_process_sender(threads: int = 2, engines: tuple[str, ...] | None = None, retries: int | None = None,
                      calibrate: bool = True, jump_forward: bool = True):
    """The app's pipeline in this process. ``calibrate``: seed the measured router first, as the
    ingress does at start-up, so that requests are routed as the app routes them; otherwise the
    router has nothing measured and its static rules send every structured request to the drafter."""
    import torch

    from models.drafter import DiffusionDrafter
    from models.verifier import ARVerifier
    from pipeline.assemble import Wiring, local_pipeline
    from pipeline.orchestrator import StructuredPolicy
    from pipeline.gateway import Gateway

    torch.set_num_threads(threads)
    drafter = DiffusionDrafter.from_pretrained(None, "cpu", "float32")
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    wiring = Wiring(jump_forward=jump_forward) if engines is None else Wiring(grammar_engines=engines,
                                                                               jump_forward=jump_forward)
    structured = StructuredPolicy() if retries is None else StructuredPolicy(max_retries=retries)
    pipe = local_pipeline(drafter, ar, wiring, structured=structured)
    gw = Gateway(pipe, "dgserve-tiny")
    loop = asyncio.new_event_loop()
    if calibrate:
        from pipeline.route_estimates import calibration_jobs

        loop.run_until_complete(pipe.calibrate(calibration_jobs(64), pipe.policy.calibration_requests))

    def send(body: dict) -> tuple[int, dict]:
        reply = loop.run_until_complete(gw.chat(json.dumps(body).encode()))
        return reply.status, reply.body

    return send


def http_sender(url: str):
    import requests

    session = requests.Session()

    def send(body: dict) -> tuple[int, dict]:
        r = session.post(f"{url.rstrip('/')}/v1/chat/completions", json=body, timeout=300)
        return r.status_code, r.json()

    return send


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", required=True, type=Path)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--url", default=None)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engines", default=None, help="grammar engines in order, e.g. xgrammar or "
                   "xgrammar,llguidance (default: the app's); in-process only")
    p.add_argument("--retries", type=int, default=None, help="structured.max_retries (default: the app's); "
                   "in-process only")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="route by the static rules "
                   "(every structured request to the drafter) instead of as the app does, measured router "
                   "calibrated first; in-process only")
    p.add_argument("--no-jump-forward", action="store_true", help="decode every token with a forward "
                   "(structured.jump_forward: false); in-process only")
    p.add_argument("--dump", type=Path, default=None, help="write one JSON line per schema (status, "
                   "latency, route, cause, stage timings) to this file")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    rows = [json.loads(line) for line in a.set.read_text().splitlines() if line.strip()]
    rows = rows[: a.limit] if a.limit else rows
    engines = tuple(a.engines.split(",")) if a.engines else None
    send = http_sender(a.url) if a.url else in_process_sender(a.threads, engines, a.retries, a.calibrate,
                                                                         not a.no_jump_forward)
    counts = collections.Counter()
    latencies: list[float] = []
    reasons = collections.Counter()
    routes = collections.Counter()
    dump = a.dump.open("w") if a.dump else None
    for i, row in enumerate(rows):
        schema = row["schema"]
        t0 = time.perf_counter()
        status, body = send(request(schema, a.max_tokens))
        latencies.append(time.perf_counter() - t0)
        if dump:
            stats = body.get("stats", {}) if status == 200 else {}
            dump.write(json.dumps({
                "i": i, "status": status, "latency_s": round(latencies[-1], 4),
                "route": body.get("route", {}).get("path") if status == 200 else None,
                "error": body["error"]["message"][:300] if status != 200 else None,
                "stats": {k: v for k, v in stats.items() if k.endswith("_s") or k.endswith("_used")
                          or k in ("retries", "draft_tokens", "repair_reused_tokens", "constrained")},
                "usage": body.get("usage") if status == 200 else None}) + "\n")
        if status == 200:
            text = body["choices"][0]["message"]["content"]
            routes[body["route"]["path"]] += 1
            for k in ("repair_used", "fallback_used", "retry_used"):
                counts[k] += bool(body.get("stats", {}).get(k))
            try:
                ok = validator_for(schema)(schema).is_valid(json.loads(text))
            except ValueError:
                ok = False
            counts["valid" if ok else "invalid_success"] += 1
        elif 400 <= status < 500:
            counts["rejected"] += 1
            reasons[cause_of_refusal(status, body["error"]["message"]).value] += 1
        else:
            counts["server_error"] += 1
    if dump:
        dump.close()
    n = len(rows)
    result = {
        "set": a.set.name, "engines": a.engines or "default", "retries": a.retries, "calibrated": a.calibrate,
        "jump_forward": not a.no_jump_forward, "n": n, "valid": counts["valid"], "rejected": counts["rejected"],
        "invalid_success": counts["invalid_success"], "server_error": counts["server_error"],
        "coverage": round(counts["valid"] / max(1, n), 4),
        "median_latency_s": round(statistics.median(latencies), 3) if latencies else None,
        "repair_used": counts["repair_used"], "fallback_used": counts["fallback_used"],
        "retry_used": counts["retry_used"],
        "routes": dict(routes), "rejections": dict(reasons.most_common()),
    }
    print(json.dumps(result) if a.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
