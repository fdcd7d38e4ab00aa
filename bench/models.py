"""Drafter vs AR tokens/s on the same checkpoint, at batch 1 and batch 8.

``python -m bench.models [--n 16] [--json]``: drafts and greedy AR answers for the same held-out
prompts; tokens/s counts output tokens (with ``<eos>``) over wall time; also time to first token
(first committed canvas for the drafter, first token for AR) and the drafter's tokens per forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from models import tasks
from models.drafter import DiffusionDrafter
from models.tokenizer import encode_prompt
from models.verifier import ARVerifier


def run(drafter, verifier, prompts, batch: int, max_new_tokens: int) -> dict:
    rows = {}
    for name in ("drafter", "ar"):
        tokens, ttft, forwards = 0, [], 0
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            if name == "drafter":
                outs = drafter.draft(chunk, max_new_tokens=max_new_tokens, seed=i)
                forwards += sum(sum(o.steps_per_canvas) for o in outs)
                ttft += [o.first_canvas_s for o in outs]
            else:
                outs = verifier.generate(chunk, max_new_tokens=max_new_tokens)
                ttft += [o.first_token_s for o in outs]
            tokens += sum(len(o.token_ids) + o.finished for o in outs)
        wall = time.perf_counter() - t0
        rows[name] = {"tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
                      "tokens": tokens}
        if name == "drafter":
            rows[name]["tokens_per_forward"] = round(tokens / forwards, 2)
    rows["speedup"] = round(rows["drafter"]["tokens_per_s"] / rows["ar"]["tokens_per_s"], 2)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    drafter = DiffusionDrafter.from_pretrained(a.checkpoint)
    verifier = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    prompts = [encode_prompt(drafter.tokenizer, e.instruction) for e in tasks.examples("eval", a.seed, a.n)]
    drafter.draft(prompts[:2], max_new_tokens=16, seed=0)  # warm-up
    verifier.generate(prompts[:2], max_new_tokens=4)
    result = {"n": a.n, "device": str(drafter.device), "batch_1": run(drafter, verifier, prompts, 1, a.max_new_tokens),
              "batch_8": run(drafter, verifier, prompts, 8, a.max_new_tokens)}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'batch':>5} {'path':>8} {'tok/s':>8} {'ttft p50 ms':>12} {'tok/fwd':>8}")
    for b in ("batch_1", "batch_8"):
        for name in ("drafter", "ar"):
            r = result[b][name]
            print(f"{b[6:]:>5} {name:>8} {r['tokens_per_s']:>8} {r['ttft_p50_ms']:>12} {r.get('tokens_per_forward', ''):>8}")
        print(f"{'':>5} {'speedup':>8} {result[b]['speedup']:>8}")


if __name__ == "__main__":
    main()
