"""GPU check of both vLLM backends against the transformers backends, on one machine.

``python -m bench.vllm_gpu [--n 16] [--max-new-tokens 128] [--json]`` (needs a CUDA GPU and
``pip install 'dgserve[vllm]'``; a few minutes). On the committed tiny DiffusionGemma and its
exported causal copy (``models/export_ar.py``), for the same held-out prompts:

* AR: transformers greedy vs vLLM greedy (tokens/s at batch 1 and batch n, identical tokens);
* drafter: transformers (``models/drafter.py``, steps per canvas and tokens per forward) vs vLLM's
  diffusion runner (tokens/s at batch 1 and batch n);
* verify: ``models.speculative.speculate_rounds`` (vLLM drafter + vLLM verifier) equals vLLM greedy.

Prints one table (or JSON). Asserts nothing about speed; reports what differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path


def _tokens(outs) -> int:
    return sum(len(o.token_ids) + o.finished for o in outs)


async def _vllm_rows(dg_dir: Path, ar_dir: Path, prompts, max_new: int, detok) -> dict:
    from models.speculative import speculate_rounds
    from models.vllm_backend import VLLMCausal, VLLMDiffusion, VLLMSettings

    rows: dict = {}
    ar = VLLMCausal.from_settings(VLLMSettings(model=str(ar_dir), dtype="float32", max_model_len=2048,
                                               gpu_memory_utilization=0.3, max_num_seqs=len(prompts)))
    await ar.generate(prompts[0], 8, detok)  # warm-up
    for batch in (1, len(prompts)):
        t = time.perf_counter()
        outs = []
        for i in range(0, len(prompts), batch):
            outs += await asyncio.gather(*(ar.generate(p, max_new, detok) for p in prompts[i:i + batch]))
        rows[f"vllm_ar_b{batch}"] = {"tokens_per_s": round(_tokens(outs) / (time.perf_counter() - t), 1)}
        rows.setdefault("vllm_ar_tokens", [list(o.token_ids) for o in outs])
    dg = VLLMDiffusion.from_settings(VLLMSettings(model=str(dg_dir), dtype="float32", max_model_len=2048,
                                                  gpu_memory_utilization=0.3, max_num_seqs=len(prompts),
                                                  attention_backend="TRITON_ATTN"))
    await dg.draft(prompts[0], 8, detok)
    for batch in (1, len(prompts)):
        t = time.perf_counter()
        outs = []
        for i in range(0, len(prompts), batch):
            outs += await asyncio.gather(*(dg.draft(p, max_new, detok, seed=i) for p in prompts[i:i + batch]))
        rows[f"vllm_drafter_b{batch}"] = {"tokens_per_s": round(_tokens(outs) / (time.perf_counter() - t), 1),
                                          "ttft_p50_ms": round(1000 * sorted(o.first_token_s for o in outs)[len(outs) // 2], 1)}
    same = 0
    t = time.perf_counter()
    accepted = []
    for p, want in zip(prompts, rows["vllm_ar_tokens"]):
        r = await speculate_rounds(ar, dg.draft_canvas, p, max_new, dg.canvas_length, detok)
        same += list(r.token_ids) == want
        accepted += list(r.accepted)
    rows["vllm_verify"] = {"identical_to_vllm_greedy": f"{same}/{len(prompts)}",
                           "mean_accepted": round(sum(accepted) / max(1, len(accepted)), 2),
                           "tokens_per_s": round(sum(len(w) for w in rows["vllm_ar_tokens"]) / (time.perf_counter() - t), 1)}
    ar.shutdown()
    dg.shutdown()
    return rows


def main(argv=None) -> None:
    import torch

    from models import tasks
    from models.drafter import DiffusionDrafter
    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT
    from models.tokenizer import encode_prompt
    from models.verifier import ARVerifier

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.vllm_gpu needs a CUDA GPU")

    ar_dir = export(DEFAULT_CHECKPOINT, Path(tempfile.mkdtemp()) / "dg-tiny-ar")
    drafter = DiffusionDrafter.from_pretrained(None, "cuda", "float32")
    ar_t = ARVerifier.from_pretrained(ar_dir, "causal", "cuda", "float32")
    prompts = [encode_prompt(drafter.tokenizer, e.instruction) for e in tasks.examples("eval", 0, a.n)]
    detok = lambda ids: drafter.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    rows: dict = {"gpu": torch.cuda.get_device_name(0)}
    drafter.draft(prompts[:2], max_new_tokens=16, seed=0)
    ar_t.generate(prompts[:2], max_new_tokens=8)
    for batch in (1, a.n):
        for name, fn in (("transformers_drafter", lambda c, i: drafter.draft(c, max_new_tokens=a.max_new_tokens, seed=i)),
                         ("transformers_ar", lambda c, i: ar_t.generate(c, max_new_tokens=a.max_new_tokens))):
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = []
            for i in range(0, len(prompts), batch):
                outs += fn(prompts[i:i + batch], i)
            torch.cuda.synchronize()
            row = {"tokens_per_s": round(_tokens(outs) / (time.perf_counter() - t), 1)}
            if name == "transformers_drafter":
                steps = [s for o in outs for s in o.steps_per_canvas]
                row["steps_per_canvas"] = round(sum(steps) / max(1, len(steps)), 2)
                row["tokens_per_forward"] = round(_tokens(outs) / max(1, sum(steps)), 2)
            else:
                rows.setdefault("transformers_ar_tokens", [list(o.token_ids) for o in outs])
            rows[f"{name}_b{batch}"] = row
    rows.update(asyncio.run(_vllm_rows(DEFAULT_CHECKPOINT, ar_dir, prompts, a.max_new_tokens, detok)))
    same = sum(x == y for x, y in zip(rows.pop("transformers_ar_tokens"), rows.pop("vllm_ar_tokens")))
    rows["ar_greedy_identical_transformers_vs_vllm"] = f"{same}/{len(prompts)}"
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    for k, v in rows.items():
        print(f"{k:44s} {v}")


if __name__ == "__main__":
    main()
