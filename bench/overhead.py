"""Serving overhead: the same request over HTTP (Ray Serve app) vs an in-process pipeline call.

``python -m bench.overhead [--n 40] [--json]`` starts the real app with ``serve.run`` on
127.0.0.1 and builds the same pipeline in-process (:class:`pipeline.gateway.Gateway` over the same
local backends), then sends ``n`` identical requests (fixed seed, so identical work) to each,
interleaved one by one, and prints p50/p90 latency of both and their difference (the serving
overhead). It also prints the paired figure: per request, latency minus the model call's time
measured inside the backend (``stats.draft_s`` / ``stats.ar_s``), the median of that over HTTP
minus in-process.

``--playground``: instead, the app with the playground off and on (``playground: true``, nobody
watching), two applications in one Serve instance, the same requests interleaved one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def request_body(route: str, max_tokens: int) -> dict:
    return {"model": "dgserve-tiny", "max_tokens": max_tokens, "seed": 7, "temperature": 0, "route": route,
            "messages": [{"role": "user", "content": "Describe Paris in a few words."}]}


def start_app(playground: tuple[bool, ...] = (False,)) -> list[str]:
    """The real app (serve.run) on 127.0.0.1:8766, once per ``playground`` setting (each its own
    application and replicas, under ``/``, ``/app1``, ...); returns each one's chat URL."""
    from deployments.data_plane import apply

    apply()  # as `make serve` starts Ray; read when ray is imported
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8766})
    urls = []
    for i, enabled in enumerate(playground):
        prefix = "/" if i == 0 else f"/app{i}"
        args = {"drafter": {"device": "cpu", "dtype": "float32"}, "playground": enabled}
        serve.run(build_app(args), name="dgserve" if i == 0 else f"dgserve{i}", route_prefix=prefix)
        urls.append(f"http://127.0.0.1:8766{prefix.rstrip('/')}/v1/chat/completions")
    return urls


def stop_app() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def model_seconds(body: dict) -> float:
    """The model call's own time, measured inside the backend (drafter or AR) for this request."""
    stats = body["stats"]
    return stats.get("draft_s", stats.get("ar_s", 0.0))


def post_once(session, url: str, body: dict) -> tuple[float, float]:
    """One request over HTTP: (latency, the model call's own seconds)."""
    t0 = time.perf_counter()
    r = session.post(url, json=body, timeout=60)
    t = time.perf_counter() - t0
    r.raise_for_status()
    return t, model_seconds(r.json())


def in_process_gateway():
    """The same pipeline as the app's, in this process, over the same local backends."""
    import torch

    from models.drafter import DiffusionDrafter
    from models.verifier import ARVerifier
    from pipeline.assemble import local_pipeline
    from pipeline.gateway import Gateway

    torch.set_num_threads(1)  # as in the drafter replica (torch_threads: 1)
    drafter = DiffusionDrafter.from_pretrained(None, "cpu", "float32")
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    return Gateway(local_pipeline(drafter, ar), "dgserve-tiny")


def measure(n: int, body: dict) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(HTTP, in-process) pairs of (latency, model seconds), requests interleaved one by one so
    that both see the same machine: drift of the model's speed over the run (other processes,
    CPU frequency) hits both sides alike instead of whichever ran second."""
    import requests

    url, = start_app()
    try:
        gw = in_process_gateway()
        raw = json.dumps(body).encode()
        loop = asyncio.new_event_loop()
        session = requests.Session()

        def local_once() -> tuple[float, float]:
            t0 = time.perf_counter()
            reply = loop.run_until_complete(gw.chat(raw))
            t = time.perf_counter() - t0
            assert reply.status == 200, reply.body
            return t, model_seconds(reply.body)

        for _ in range(3):
            post_once(session, url, body)
            local_once()
        http, local = [], []
        for i in range(n):  # alternate which side goes first
            if i % 2:
                http.append(post_once(session, url, body))
                local.append(local_once())
            else:
                local.append(local_once())
                http.append(post_once(session, url, body))
        loop.close()
        return http, local
    finally:
        stop_app()


def playground_cost(n: int, body: dict) -> dict:
    """The same requests to two apps in one run, the playground off and on (nobody watching),
    interleaved one by one: latency p50 of each, and the paired figure (latency minus the model
    call's own time)."""
    import requests

    off_url, on_url = start_app((False, True))
    try:
        session = requests.Session()
        for _ in range(3):
            post_once(session, off_url, body)
            post_once(session, on_url, body)
        off, on = [], []
        for i in range(n):  # alternate which side goes first
            if i % 2:
                off.append(post_once(session, off_url, body))
                on.append(post_once(session, on_url, body))
            else:
                on.append(post_once(session, on_url, body))
                off.append(post_once(session, off_url, body))
    finally:
        stop_app()
    ms = lambda x: round(1000 * x, 2)  # noqa: E731
    outside = {name: statistics.median(t - m for t, m in pairs) for name, pairs in (("off", off), ("on", on))}
    return {"n": n, "route": body["route"],
            "playground_off_p50_ms": ms(statistics.median(t for t, _ in off)),
            "playground_on_p50_ms": ms(statistics.median(t for t, _ in on)),
            "playground_off_outside_model_p50_ms": ms(outside["off"]),
            "playground_on_outside_model_p50_ms": ms(outside["on"]),
            "playground_cost_paired_p50_ms": ms(outside["on"] - outside["off"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--route", default="diffusion", choices=["diffusion", "ar"])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true")
    p.add_argument("--playground", action="store_true",
                   help="instead: the app with the playground off vs on (nobody watching), same run")
    a = p.parse_args(argv)
    body = request_body(a.route, a.max_tokens)
    if a.playground:
        result = playground_cost(a.n, body)
        print(json.dumps(result) if a.json else "\n".join(f"{k:36s} {v}" for k, v in result.items()))
        return
    http_pairs, local_pairs = measure(a.n, body)
    local, http = [t for t, _ in local_pairs], [t for t, _ in http_pairs]
    ms = lambda x: round(1000 * x, 2)  # noqa: E731
    result = {
        "n": a.n, "route": a.route,
        "http_p50_ms": ms(statistics.median(http)), "http_p90_ms": ms(pct(http, 0.9)),
        "inprocess_p50_ms": ms(statistics.median(local)), "inprocess_p90_ms": ms(pct(local, 0.9)),
    }
    result["overhead_p50_ms"] = round(result["http_p50_ms"] - result["inprocess_p50_ms"], 2)
    result["overhead_p90_ms"] = round(result["http_p90_ms"] - result["inprocess_p90_ms"], 2)
    # Paired per request: latency minus the model call's own time (measured inside the backend),
    # so run-to-run drift of the model's speed cancels; the difference is what serving adds.
    outside_http = statistics.median(t - m for t, m in http_pairs)
    outside_local = statistics.median(t - m for t, m in local_pairs)
    result["http_outside_model_p50_ms"] = ms(outside_http)
    result["inprocess_outside_model_p50_ms"] = ms(outside_local)
    result["overhead_paired_p50_ms"] = ms(outside_http - outside_local)
    print(json.dumps(result) if a.json else "\n".join(f"{k:20s} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
