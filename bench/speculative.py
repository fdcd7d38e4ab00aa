"""Speculative verification vs AR-only greedy on the same checkpoint, same prompts, same run.

``python -m bench.speculative --n 50 [--draft-steps K] [--json]`` prints ``identical`` (every
output equal to AR-only greedy, token for token), ``mean_accepted`` (tokens per round, the pinned
token included), ``verifier_forwards_per_token``, ``ar_tokens_per_s``, ``verify_tokens_per_s`` and
``speedup`` (verify over AR-only).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models import tasks
from models.drafter import DiffusionDrafter
from models.speculative import SpeculativeDecoder
from models.tokenizer import encode_prompt
from models.verifier import ARVerifier


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--draft-steps", type=int, default=None, help="denoising steps per draft (default: checkpoint's)")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    drafter = DiffusionDrafter.from_pretrained(a.checkpoint)
    verifier = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
    spec = SpeculativeDecoder(drafter, verifier, draft_steps=a.draft_steps)
    prompts = [encode_prompt(drafter.tokenizer, e.instruction) for e in tasks.examples("eval", a.seed, a.n)]
    spec.generate(prompts[0], 16)
    verifier.generate(prompts[:1], 16)
    ar_time = spec_time = 0.0
    tokens = forwards = 0
    accepted: list[int] = []
    identical = True
    for i, prompt in enumerate(prompts):
        t0 = time.perf_counter()
        ref = verifier.generate([prompt], a.max_new_tokens)[0]
        t1 = time.perf_counter()
        out = spec.generate(prompt, a.max_new_tokens, seed=i)
        t2 = time.perf_counter()
        ar_time += t1 - t0
        spec_time += t2 - t1
        identical &= out.token_ids == ref.token_ids
        tokens += len(ref.token_ids)
        forwards += out.verifier_forwards
        accepted.extend(out.accepted)
    result = {
        "n": a.n,
        "identical": identical,
        "mean_accepted": round(sum(accepted) / len(accepted), 3),
        "verifier_forwards_per_token": round(forwards / max(1, tokens), 3),
        "ar_tokens_per_s": round(tokens / ar_time, 1),
        "verify_tokens_per_s": round(tokens / spec_time, 1),
        "speedup": round(ar_time / spec_time, 3),
        "draft_steps": spec.settings.max_steps,
    }
    print(json.dumps(result) if a.json else "\n".join(f"{k:28s} {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
