"""Schema-valid rate and latency on held-out synthetic prompts: drafter alone, drafter + canvas
guidance, and the full pipeline (guided draft -> validate -> repair -> fallback).

``python -m bench.structured --n 100 [--json]`` also reports how often the pipeline needed a
repair and how many draft tokens the repairs reused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from models import tasks
from models.drafter import DiffusionDrafter
from models.evaluate import schema_valid
from models.tokenizer import encode_prompt
from models.verifier import ARVerifier
from pipeline.assemble import local_pipeline
from pipeline.interfaces import Constraint, Job
from pipeline.router import RouteDecision


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    drafter = DiffusionDrafter.from_pretrained()
    ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    pipe = local_pipeline(drafter, ar)
    grammar = pipe.ar.decoding.grammar
    exs = list(tasks.examples("eval", a.seed, a.n, kind="json"))
    rows: dict[str, dict] = {}

    def record(name, valid, times, extra=None):
        rows[name] = {"schema_valid": round(sum(valid) / len(valid), 4),
                      "median_latency_ms": round(1000 * statistics.median(times), 1), **(extra or {})}

    for name, guided in (("drafter", False), ("drafter+guidance", True)):
        valid, times = [], []
        for i, ex in enumerate(exs):
            hook = grammar.canvas_hook("json_schema", ex.schema, drafter.canvas_length) if guided else None
            t0 = time.perf_counter()
            d = drafter.draft([encode_prompt(drafter.tokenizer, ex.instruction)], 128, hooks=[hook], seed=i)[0]
            times.append(time.perf_counter() - t0)
            valid.append(schema_valid(d.text, ex.schema))
        record(name, valid, times)

    valid, times, repairs, reused, fallbacks = [], [], 0, [], 0
    for i, ex in enumerate(exs):
        job = Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=128, temperature=0.0, seed=i,
                  constraint=Constraint("json_schema", ex.schema))
        t0 = time.perf_counter()
        out = asyncio.run(pipe.run(job, RouteDecision("diffusion", "bench")))
        times.append(time.perf_counter() - t0)
        valid.append(schema_valid(out.result.text, ex.schema))
        repairs += bool(out.stats.repair_used)
        fallbacks += bool(out.stats.fallback_used)
        if out.stats.repair_used:
            reused.append(out.stats.repair_reused_tokens or 0)
    record("pipeline", valid, times, {"repair_rate": round(repairs / len(exs), 4), "fallback_rate": round(fallbacks / len(exs), 4),
                                      "repair_reused_tokens_mean": round(sum(reused) / max(1, len(reused)), 2)})
    result = {"n": a.n, "seed": a.seed, **rows}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'path':18s} {'schema-valid':>12s} {'p50 ms':>8s}  notes")
    for name, r in rows.items():
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("schema_valid", "median_latency_ms"))
        print(f"{name:18s} {r['schema_valid']:>12} {r['median_latency_ms']:>8}  {notes}")


if __name__ == "__main__":
    main()
