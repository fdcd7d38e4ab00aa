"""The adoption evaluation: a workload against OpenAI-compatible targets, side by side, in five parts.

``python -m bench.evaluate --workload extraction --target dgserve=http://127.0.0.1:8000@dgserve-tiny
--route auto,ar --target vllm=http://127.0.0.1:8777@peer --concurrency 1,4,16 --out eval/``

or, with nothing running, ``--serve`` (the embedded dgserve app, started here on 127.0.0.1) and
``--peer`` (the vLLM peer on the same weights, ``bench/peer.py``); the servers run one after the
other, so they never share the cores. Writes ``results.json``, ``report.md`` (its tables are read
from ``results.json`` alone) and PNG plots to ``--out``.

* targets: ``--target NAME=URL[@MODEL][#ROUTE]`` (repeatable; ``URL`` is the server's base). A
  dgserve target (its ``/v1/models`` says ``owned_by: dgserve``) given no ``#ROUTE`` becomes one target
  per ``--route`` (the request field ``route``); other targets get the plain OpenAI request.
* workloads: ``--workload NAME|FILE`` (repeatable; ``bench/workload.py`` describes the JSONL and the
  three shipped), ``--n`` takes the first requests of each.
* streaming: ``--stream off|on|both``: a streamed request's time to first chunk is its first content
  delta; a non-streamed request's first useful output is its whole answer.

The five parts, per workload, target, concurrency and streaming mode:

1. throughput: output tokens/s and requests/s over the level's wall time (a closed loop of ``c``
   clients);
2. quality: schema-valid rate (checked here, with jsonschema, not taken from the server), exact match
   against the gold answer (JSON compared after parsing), invalid successes (a 200 whose content fails
   its constraint), revision rate (answers the validator or verifier changed: dgserve's
   ``stats.repair_used`` / ``fallback_used``);
3. UX: time to first chunk and to the final answer, p50 / p90;
4. operations: errors by status, fallbacks, repairs, timeouts (expired model loops, drafter
   timeouts), and with ``--metrics URL`` the change of every ``dgserve`` counter on that Prometheus
   endpoint over the run;
5. economics: model forwards per output token and tokens per forward (dgserve's ``stats``; an AR
   server is counted one forward per token), and the cost per million output tokens at
   ``--gpu-hour-usd`` for ``--replicas`` replicas at the measured tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from deployments.data_plane import apply as apply_ray_env

apply_ray_env()  # as `make serve` starts Ray; read when Ray is imported (a value already set wins)

from bench import workload as workloads  # noqa: E402

STAGES = ("draft_s", "verify_s", "ar_s")  # per-answer stage seconds dgserve reports in `stats`


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # base, e.g. http://127.0.0.1:8000
    model: str | None = None
    route: str | None = None  # dgserve's request field `route`

    @property
    def label(self) -> str:
        return f"{self.name} {self.route}" if self.route else self.name


def parse_target(spec: str) -> Target:
    """``NAME=URL[@MODEL][#ROUTE]``."""
    m = re.fullmatch(r"([^=]+)=(https?://[^@#]+?)/?(?:@([^#]+))?(?:#(\w+))?", spec)
    if m is None:
        raise argparse.ArgumentTypeError(f"--target wants NAME=URL[@MODEL][#ROUTE], not {spec!r}")
    name, url, model, route = m.groups()
    return Target(name, url.removesuffix("/v1"), model, route)


def resolve(target: Target, routes: list[str]) -> list[Target]:
    """The model name (the server's first when none is given) and, for a dgserve target without a
    route, one target per route."""
    import requests

    models = requests.get(f"{target.url}/v1/models", timeout=10).json()["data"]
    model = target.model or models[0]["id"]
    dgserve = any(m.get("owned_by") == "dgserve" for m in models)
    t = replace(target, model=model)
    if dgserve and t.route is None and routes:
        return [replace(t, route=r) for r in routes]
    return [t]


# -- one request --------------------------------------------------------------------------------
def request_body(target: Target, item: dict, stream: bool) -> dict:
    body = {"model": target.model, "messages": item["messages"], "max_tokens": item.get("max_tokens", 64),
            "temperature": 0, "seed": 0}
    if item.get("response_format") is not None:
        body["response_format"] = item["response_format"]
    if target.route is not None:
        body["route"] = target.route
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def send(session, target: Target, item: dict, stream: bool, timeout_s: float) -> dict:
    """One request: status, seconds to the first content and to the end, content, tokens, and
    what dgserve says of it (route, stats) when it says anything."""
    start = time.perf_counter()
    out = {"id": item["id"], "status": 0, "seconds": 0.0, "first_s": None, "content": None, "tokens": 0,
           "route": None, "stats": {}}
    try:
        r = session.post(f"{target.url}/v1/chat/completions", json=request_body(target, item, stream),
                         timeout=timeout_s, stream=stream)
        out["status"] = r.status_code
        if r.status_code == 200 and not stream:
            reply = r.json()
            out["content"] = reply["choices"][0]["message"].get("content") or ""
            out["tokens"] = (reply.get("usage") or {}).get("completion_tokens", 0)
            out["route"] = (reply.get("route") or {}).get("path")
            out["stats"] = reply.get("stats") or {}
        elif r.status_code == 200:
            parts: list[str] = []
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    out["status"] = int(chunk["error"].get("code") or 500) if str(
                        chunk["error"].get("code", "")).isdigit() else 500
                    break
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        if out["first_s"] is None:
                            out["first_s"] = time.perf_counter() - start
                        parts.append(text)
                if chunk.get("usage"):
                    out["tokens"] = chunk["usage"].get("completion_tokens", 0)
                if chunk.get("route"):
                    out["route"] = chunk["route"].get("path")
                if chunk.get("stats"):
                    out["stats"] = chunk["stats"]
            out["content"] = "".join(parts)
        else:
            r.close()
    except Exception as e:  # noqa: BLE001 - a transport failure is an outcome of the run, not of the harness
        out["status"] = 0
        out["error"] = type(e).__name__
    out["seconds"] = time.perf_counter() - start
    if out["status"] == 200 and out["first_s"] is None:
        out["first_s"] = out["seconds"]  # not streamed: the first useful output is the whole answer
    return out


def grade(item: dict, content: str | None) -> tuple[bool | None, bool | None]:
    """(valid, exact): whether ``content`` satisfies the request's constraint (None: it has none),
    and whether it equals the gold answer (None: no gold)."""
    if content is None:
        return None, None
    fmt = item.get("response_format") or {}
    kind = fmt.get("type")
    parsed, parses = None, False
    try:
        parsed, parses = json.loads(content), True
    except ValueError:
        pass
    valid: bool | None = None
    if kind == "json_schema":
        from jsonschema.validators import validator_for

        schema = fmt["json_schema"]["schema"]
        valid = parses and validator_for(schema)(schema).is_valid(parsed)
    elif kind == "json_object":
        valid = parses and isinstance(parsed, dict)
    elif kind == "regex":
        valid = re.fullmatch(fmt["regex"]["pattern"], content) is not None
    exact = None
    if "gold" in item:
        gold = item["gold"]
        exact = content.strip() == gold.strip() if isinstance(gold, str) and not kind else parses and parsed == gold
    return valid, exact


# -- one level ----------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def forwards(result: dict) -> float | None:
    """Model forwards this answer cost, as far as the response tells: dgserve's denoising steps and
    verifier forwards, one forward per token for an AR answer (and for a server that says nothing)."""
    s = result["stats"]
    if not result["tokens"] or (not s and result["route"] is not None):
        return None  # dgserve said nothing of its forwards (a stream carries no stats)
    if "denoising_steps" in s or "verifier_forwards" in s:
        n = s.get("denoising_steps", 0) + s.get("verifier_forwards", 0)
        if s.get("repair_used") or s.get("fallback_used"):
            n += result["tokens"] - s.get("repair_reused_tokens", 0)  # what AR decoded afterwards
        return float(n)
    return float(result["tokens"])


def summarize(items: list[dict], results: list[dict], wall_s: float, gpu_hour_usd: float, replicas: int) -> dict:
    by_id = {it["id"]: it for it in items}
    ok = [r for r in results if r["status"] == 200]
    graded = [(r, *grade(by_id[r["id"]], r["content"])) for r in ok]
    constrained = [g for g in graded if g[1] is not None]
    golds = [g for g in graded if g[2] is not None]
    statuses = Counter(str(r["status"]) for r in results)
    tokens = sum(r["tokens"] for r in ok)
    tok_s = tokens / wall_s if wall_s > 0 else 0.0
    fw = [f for f in (forwards(r) for r in ok) if f]
    stats = [r["stats"] for r in ok]
    dg = [s for s in stats if s]
    dgserve = any(r["route"] for r in ok)  # the server says which path served each answer
    revised = sum(bool(s.get("repair_used") or s.get("fallback_used")) for s in dg)
    n = len(results)
    structured = any(by_id[r["id"]].get("response_format") for r in results)
    has_gold = any("gold" in by_id[r["id"]] for r in results)
    valid = sum(bool(g[1]) for g in constrained)
    exact = sum(bool(g[2]) for g in golds)
    return {
        "n": n,
        "ok": len(ok),
        # quality, out of every request sent (a refusal is neither valid nor exact)
        "valid": valid if structured else None,
        "valid_rate": valid / n if structured and n else None,
        "exact": exact if has_gold else None,
        "exact_rate": exact / n if has_gold and n else None,
        "invalid_success": sum(g[1] is False for g in constrained),
        "revised": revised if dg else None,
        "revision_rate": revised / len(dg) if dg else None,
        # UX
        "p50_s": pct([r["seconds"] for r in ok], 0.5),
        "p90_s": pct([r["seconds"] for r in ok], 0.9),
        "ttft_p50_s": pct([r["first_s"] for r in ok], 0.5),
        "ttft_p90_s": pct([r["first_s"] for r in ok], 0.9),
        # throughput
        "wall_s": wall_s,
        "tokens": tokens,
        "tok_per_s": tok_s,
        "req_per_s": n / wall_s if wall_s > 0 else 0.0,
        # operations
        "errors": {k: v for k, v in sorted(statuses.items()) if k != "200"},
        "fallbacks": sum(bool(s.get("fallback_used")) for s in dg) if dg or not dgserve else None,
        "repairs": sum(bool(s.get("repair_used")) for s in dg) if dg or not dgserve else None,
        "timeouts": sum(bool(s.get("expired") or s.get("drafter_error") == "timeout") for s in dg)
        + statuses.get("504", 0) + statuses.get("408", 0),
        "routes": dict(Counter(r["route"] for r in ok if r["route"])),
        "stage_s": {k: _mean([s[k] for s in dg if k in s]) for k in STAGES if any(k in s for s in dg)},
        # economics
        "forwards_per_token": sum(fw) / sum(r["tokens"] for r in ok if forwards(r)) if fw else None,
        "tokens_per_forward": sum(r["tokens"] for r in ok if forwards(r)) / sum(fw) if fw else None,
        "cost_per_mtok_usd": gpu_hour_usd * replicas * 1e6 / (3600 * tok_s) if tok_s > 0 else None,
    }


def run_level(target: Target, items: list[dict], clients: int, stream: bool, timeout_s: float,
              progress=None) -> tuple[list[dict], float]:
    """Every item once, by ``clients`` closed-loop clients; streamed when ``stream`` or the item
    says ``"stream": true`` (a mixed workload)."""
    import requests

    local = threading.local()

    def one(item):
        if not hasattr(local, "session"):
            local.session = requests.Session()
        r = send(local.session, target, item, stream or bool(item.get("stream")), timeout_s)
        if progress is not None:
            progress.update(1)
        return r

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, items))
    return results, time.perf_counter() - start


def scrape(url: str | None) -> dict[str, float]:
    """The ``dgserve`` counters of a Prometheus endpoint, summed over their labels."""
    if url is None:
        return {}
    import requests

    out: dict[str, float] = {}
    try:
        text = requests.get(url, timeout=10).text
    except requests.RequestException:
        return {}
    for line in text.splitlines():
        if line.startswith("#") or "dgserve" not in line:
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if not name.endswith(("_total", "_count")):
            continue
        try:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        except ValueError:
            pass
    return out


# -- the run ------------------------------------------------------------------------------------
@dataclass
class Plan:
    workloads: list[tuple[str, list[dict]]]
    levels: list[int]
    streams: list[bool]
    timeout_s: float
    gpu_hour_usd: float
    replicas: int
    metrics: str | None
    warmup: int = 2


def evaluate_targets(plan: Plan, targets: list[Target], progress=None) -> list[dict]:
    runs = []
    for t in targets:
        for wname, items in plan.workloads:
            for item in items[: plan.warmup]:  # first requests pay for compiled kernels, not for serving
                with contextlib.suppress(Exception):
                    import requests

                    send(requests.Session(), t, item, False, plan.timeout_s)
            for stream in plan.streams:
                for c in plan.levels:
                    before = scrape(plan.metrics)
                    results, wall = run_level(t, items, c, stream, plan.timeout_s, progress)
                    after = scrape(plan.metrics)
                    summary = summarize(items, results, wall, plan.gpu_hour_usd, plan.replicas)
                    summary["metrics"] = {k: after[k] - before.get(k, 0.0) for k in after
                                          if after[k] - before.get(k, 0.0)}
                    runs.append({"workload": wname, "target": t.label, "url": t.url, "model": t.model,
                                 "route": t.route, "stream": stream, "concurrency": c, **summary})
    return runs


@contextlib.contextmanager
def serve_dgserve(port: int, top: int) -> Iterator[str]:
    """The embedded dgserve app (the committed checkpoint) under ``serve.run`` on 127.0.0.1."""
    import ray
    from ray import serve

    import requests

    from deployments.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"drafter": {"device": "cpu", "dtype": "float32", "replica": {"max_ongoing_requests": 4 * top}},
                "verifier": {"max_num_seqs": top}, "limits": {"max_in_flight": 4 * top},
                "ingress": {"max_ongoing_requests": 4 * top + 8}}
        serve.run(build_app(args), name="dgserve", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while requests.get(f"{url}/health", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url}/health did not answer 200 within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def write_outputs(out: Path, results: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from bench.evaluate_report import plots, report

    images = plots(results, out)
    (out / "report.md").write_text(report(results, [p.name for p in images]))
    return images


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=parse_target, action="append", default=[])
    ap.add_argument("--route", default="auto,ar", help="dgserve routes to measure, comma-separated")
    ap.add_argument("--workload", action="append", default=[])
    ap.add_argument("--n", type=int, default=None, help="first N requests of each workload")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--stream", choices=("off", "on", "both"), default="off")
    ap.add_argument("--serve", action="store_true", help="start the embedded dgserve app here")
    ap.add_argument("--peer", action="store_true", help="start the vLLM peer on the same weights")
    ap.add_argument("--port", type=int, default=8768, help="--serve's port")
    ap.add_argument("--metrics", default=None, help="a Prometheus endpoint to read dgserve's counters from")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--gpu-hour-usd", type=float, default=2.5)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("eval"))
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if not (a.target or a.serve or a.peer):
        ap.error("give --target, --serve or --peer")
    loaded = [workloads.load(w) for w in (a.workload or ["extraction"])]
    plan = Plan([(name, items[: a.n] if a.n else items) for name, items in loaded],
                [int(x) for x in a.concurrency.split(",")],
                {"off": [False], "on": [True], "both": [False, True]}[a.stream], a.timeout,
                a.gpu_hour_usd, a.replicas, a.metrics)
    routes = [r for r in a.route.split(",") if r]
    per_target = len(plan.levels) * len(plan.streams) * sum(len(items) for _, items in plan.workloads)
    n_targets = len(a.target) * max(1, len(routes)) + (len(routes) if a.serve else 0) + (1 if a.peer else 0)
    progress = None
    if not a.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=per_target * n_targets, unit="req", file=sys.stderr, desc="evaluate")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    runs: list[dict] = []
    try:
        targets = [t for spec in a.target for t in resolve(spec, routes)]
        if progress is not None:
            progress.total = per_target * (len(targets) + (len(routes) if a.serve else 0) + (1 if a.peer else 0))
        runs += evaluate_targets(plan, targets, progress)
        if a.serve:
            with serve_dgserve(a.port, max(plan.levels)) as url:
                runs += evaluate_targets(plan, resolve(Target("dgserve", url), routes), progress)
        if a.peer:
            from bench.peer import peer

            with peer(max_num_seqs=max(plan.levels)) as url:
                runs += evaluate_targets(plan, resolve(Target("vLLM", url), routes), progress)
    finally:
        if progress is not None:
            progress.close()
    results = {"meta": {"command": "python -m bench.evaluate " + " ".join(sys.argv[1:] if argv is None else argv),
                        "started": started, "workloads": {n: len(i) for n, i in plan.workloads},
                        "concurrency": plan.levels, "gpu_hour_usd": plan.gpu_hour_usd, "replicas": plan.replicas},
               "runs": runs}
    images = write_outputs(a.out, results)
    print(f"wrote {a.out / 'results.json'}, {a.out / 'report.md'} and {len(images)} plots", file=sys.stderr)


if __name__ == "__main__":
    main()
