"""Held-out evaluation of a checkpoint: unconstrained drafter and AR schema-validity and speed.

``python -m models.evaluate --n 200 --seed 7 --json`` prints one JSON object:

* ``drafter_schema_valid`` / ``ar_schema_valid``: fraction of answers (no constraints applied)
  that parse as JSON and validate against the example's schema;
* ``drafter_exact`` / ``ar_exact``: fraction equal to the reference instance;
* ``drafter_tokens_per_forward``: output tokens (with ``<eos>``) per decoder forward, pooled;
* ``drafter_steps_per_canvas``: mean decoder forwards per committed canvas;
* ``drafter_tokens_per_s`` / ``ar_tokens_per_s``: output tokens over wall time, same batches.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from . import tasks
from .tokenizer import encode_prompt


def schema_valid(text: str, schema: dict) -> bool:
    from jsonschema.validators import validator_for

    try:
        instance = json.loads(text)
    except ValueError:
        return False
    cls = validator_for(schema)
    return cls(schema).is_valid(instance)


def evaluate(drafter, verifier, n: int, seed: int, batch_size: int = 16, max_new_tokens: int = 128) -> dict:
    exs = list(tasks.examples("eval", seed, n, kind="json"))
    tok = drafter.tokenizer
    prompts = [encode_prompt(tok, e.instruction) for e in exs]
    d_valid = a_valid = d_exact = a_exact = 0
    d_tokens = d_forwards = a_tokens = 0
    d_time = a_time = 0.0
    steps: list[int] = []
    for i in range(0, n, batch_size):
        chunk, batch = exs[i:i + batch_size], prompts[i:i + batch_size]
        t0 = time.perf_counter()
        drafts = drafter.draft(batch, max_new_tokens=max_new_tokens, seed=seed * 100_003 + i)
        t1 = time.perf_counter()
        gens = verifier.generate(batch, max_new_tokens=max_new_tokens)
        t2 = time.perf_counter()
        d_time += t1 - t0
        a_time += t2 - t1
        for ex, d, g in zip(chunk, drafts, gens):
            d_valid += schema_valid(d.text, ex.schema)
            a_valid += schema_valid(g.text, ex.schema)
            d_exact += d.text == ex.target
            a_exact += g.text == ex.target
            d_tokens += len(d.token_ids) + d.finished
            d_forwards += sum(d.steps_per_canvas)
            steps.extend(d.steps_per_canvas)
            a_tokens += len(g.token_ids) + g.finished
    return {
        "n": n,
        "seed": seed,
        "drafter_schema_valid": round(d_valid / n, 4),
        "ar_schema_valid": round(a_valid / n, 4),
        "drafter_exact": round(d_exact / n, 4),
        "ar_exact": round(a_exact / n, 4),
        "drafter_tokens_per_forward": round(d_tokens / max(1, d_forwards), 3),
        "drafter_steps_per_canvas": round(sum(steps) / max(1, len(steps)), 3),
        "drafter_tokens_per_s": round(d_tokens / d_time, 1),
        "ar_tokens_per_s": round(a_tokens / a_time, 1),
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> None:
    from .drafter import DiffusionDrafter
    from .verifier import ARVerifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    # sampler settings other than the checkpoint's generation_config (operating-point sweeps)
    for name in ("max_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold"):
        p.add_argument("--" + name.replace("_", "-"), type=int if name == "max_steps" else float, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    drafter = DiffusionDrafter.from_pretrained(a.checkpoint)
    changed = {k: getattr(a, k) for k in ("max_steps", "entropy_bound", "t_min", "t_max", "confidence_threshold")
               if getattr(a, k) is not None}
    if changed:
        from .drafter import DraftSettings

        drafter.settings = DraftSettings(**{**drafter.settings.__dict__, **changed})
    verifier = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    result = evaluate(drafter, verifier, a.n, a.seed, a.batch_size)
    result["sampler"] = drafter.settings.__dict__
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:30s} {v}")


if __name__ == "__main__":
    main()
