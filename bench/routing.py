"""The router against each fixed route on a mixed workload, one run, same prompts.

``python -m bench.routing [--n 40] [--concurrency 1,8] [--json]``

Starts the embedded app (the committed checkpoint, ``router.policy: measured``: it calibrates every
path at start-up), then sends the same mixed workload once per route (``auto``, ``ar``,
``diffusion``, ``verify``) at each concurrency (a closed loop of ``c`` clients): 40% structured
extraction requests with gold answers (``bench/workloads/extraction.jsonl``), 40% prose, 20%
streamed prose (``prose.jsonl``), interleaved. Per row: mean and p50 latency to the whole answer,
requests/s, exact-match rate of the structured answers against their gold, schema-valid rate,
invalid successes, and the paths taken (``mix``).

Then the **replay**: the same policy (:func:`pipeline.router.choose_route`, a pure function) over
the same requests' shapes on the GPU-like cost profile below (the published H100 figures), at each
concurrency, to show which way it turns where the drafter is the fast path.

The targets (issue #22): at each concurrency, ``auto``'s mean latency at most 1.05x the best fixed
route's, its exact-match rate at least the best fixed route's minus 0.02, its requests/s at least the
best fixed route's divided by 1.05. The last line is one JSON object:
``{"results": [{"concurrency", "route", "mean_s", "p50_s", "req_per_s", "exact", "valid", "mix"}, ...],
"targets": [...], "replay": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter

from bench.evaluate import Target, grade, pct, run_level, send, serve_dgserve
from bench.workload import load
from pipeline.route_estimates import PathEstimate
from pipeline.router import Load, RequestShape, RouterPolicy, choose_route, eligible_paths

ROUTES = ("auto", "ar", "diffusion", "verify")

# The published H100 figures (transformers' DiffusionGemma model card; ../shared/FIELD-NOTES.md):
# 1,282 tok/s per request for the drafter vs 205 for AR, first token 489 vs 53 ms, the drafter
# served at --max-num-seqs 4. A 256-token answer: the drafter one canvas ~0.49 s; AR 0.053 + 256 /
# 205 ~1.30 s. Beyond 4 in flight the drafter queues in waves of 4 (~0.49 / 4 s per request in
# flight); AR batches (~1% per request in flight). Crossover: 0.49 + 0.1225 n = 1.30 + 0.013 n,
# n ~7.4. The verify route: a canvas per round plus AR's verify forward, between the two.
GPU_LIKE = {"ar": PathEstimate(1.30, 0.013, 0.053), "diffusion": PathEstimate(0.49, 0.1225, 0.489),
            "verify": PathEstimate(0.75, 0.10, 0.30)}


def mixed(n: int) -> list[dict]:
    """``n`` requests: 40% structured extraction, 40% prose, 20% streamed prose, interleaved
    (s p s p t per five), each item marked ``stream``."""
    _, extraction = load("extraction")
    _, prose = load("prose")
    out, e, p = [], iter(extraction), iter(prose)
    for i in range(n):
        kind = ("s", "p", "s", "p", "t")[i % 5]
        item = dict(next(e) if kind == "s" else next(p))
        item["stream"] = kind == "t"
        item["id"] = f"{item['id']}{'-stream' if kind == 't' else ''}"
        out.append(item)
    return out


def row(items: list[dict], results: list[dict], wall_s: float, concurrency: int, route: str) -> dict:
    by_id = {it["id"]: it for it in items}
    ok = [r for r in results if r["status"] == 200]
    graded = [grade(by_id[r["id"]], r["content"]) for r in ok]
    structured = [it for it in items if it.get("response_format")]
    golds = [it for it in items if "gold" in it]
    seconds = [r["seconds"] for r in ok]
    return {"concurrency": concurrency, "route": route, "n": len(results), "ok": len(ok),
            "mean_s": round(statistics.fmean(seconds), 4) if seconds else None,
            "p50_s": round(pct(seconds, 0.5), 4) if seconds else None,
            "req_per_s": round(len(results) / wall_s, 3) if wall_s > 0 else 0.0,
            "exact": round(sum(x is True for _, x in graded) / len(golds), 3) if golds else None,
            "valid": round(sum(v is True for v, _ in graded) / len(structured), 3) if structured else None,
            "invalid_success": sum(v is False for v, _ in graded),
            "errors": dict(Counter(str(r["status"]) for r in results if r["status"] != 200)),
            "mix": dict(Counter(r["route"] for r in ok if r["route"]))}


def targets(rows: list[dict]) -> list[dict]:
    """Per concurrency: ``auto`` against the best fixed route on each measure."""
    out = []
    for c in sorted({r["concurrency"] for r in rows}):
        at = {r["route"]: r for r in rows if r["concurrency"] == c}
        auto, fixed = at.get("auto"), [r for k, r in at.items() if k != "auto" and r["ok"] == r["n"]]
        if auto is None or not fixed:
            continue
        best_mean = min(r["mean_s"] for r in fixed)
        best_exact = max(r["exact"] or 0.0 for r in fixed)
        best_rps = max(r["req_per_s"] for r in fixed)
        out.append({"concurrency": c,
                    "mean_ratio": round(auto["mean_s"] / best_mean, 3), "mean_ok": auto["mean_s"] <= 1.05 * best_mean,
                    "exact_gap": round((auto["exact"] or 0.0) - best_exact, 3),
                    "exact_ok": (auto["exact"] or 0.0) >= best_exact - 0.02,
                    "rps_ratio": round(auto["req_per_s"] / best_rps, 3), "rps_ok": auto["req_per_s"] >= best_rps / 1.05})
    return out


REPLAY_LEVELS = (1, 4, 8, 16)


def replay(items: list[dict], levels=REPLAY_LEVELS, profile: dict[str, PathEstimate] = GPU_LIKE) -> list[dict]:
    """The policy's choices for these requests' shapes on a cost profile, ``c - 1`` others in flight."""
    policy = RouterPolicy()
    out = []
    for c in levels:
        mix: Counter = Counter()
        for it in items:
            shape = RequestShape(bool(it.get("response_format")), bool(it.get("stream")), 0.0,
                                 max_tokens=it.get("max_tokens", 64))
            kind = "structured" if shape.structured else "stream" if shape.stream else "prose"
            d = choose_route(shape, Load(0, True, c - 1), policy, profile, eligible_paths(shape, True, True))
            mix[f"{kind}->{d.path}"] += 1
        out.append({"concurrency": c, "profile": "gpu-like", "mix": dict(sorted(mix.items()))})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40, help="requests per route and concurrency")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--routes", default=",".join(ROUTES))
    ap.add_argument("--port", type=int, default=8769)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    a = ap.parse_args(argv)
    items = mixed(a.n)
    levels = [int(x) for x in a.concurrency.split(",")]
    routes = [r for r in a.routes.split(",") if r]
    rows: list[dict] = []
    with serve_dgserve(a.port, max(levels)) as url:
        import requests

        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        for c in levels:
            for route in routes:
                target = Target("dgserve", url, model, route)
                for it in items[:2]:  # warm the route's kernels, unrecorded here
                    send(requests.Session(), target, it, bool(it.get("stream")), a.timeout)
                results, wall = run_level(target, items, c, False, a.timeout)
                rows.append(row(items, results, wall, c, route))
                r = rows[-1]
                print(f"c={c:<3} {route:<10} mean {r['mean_s']} s  p50 {r['p50_s']} s  {r['req_per_s']} req/s  "
                      f"exact {r['exact']}  valid {r['valid']}  errors {r['errors']}  mix {r['mix']}", file=sys.stderr)
        health = requests.get(f"{url}/health", timeout=10).json()
    verdicts = targets(rows)
    for v in verdicts:
        print(f"c={v['concurrency']}: auto mean {v['mean_ratio']}x best fixed (ok: {v['mean_ok']}), exact "
              f"{v['exact_gap']:+} (ok: {v['exact_ok']}), req/s {v['rps_ratio']}x (ok: {v['rps_ok']})", file=sys.stderr)
    replayed = replay(items)
    for r in replayed:
        print(f"replay gpu-like c={r['concurrency']}: {r['mix']}", file=sys.stderr)
    out = {"results": rows, "targets": verdicts, "replay": replayed,
           "estimates": health.get("router", {}).get("estimates")}
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
