"""The device check: the GPU path at the real 26B-A4B shape, in one run of at most ~8 minutes.

``python -m bench.gpu_check --json`` on one GPU (H100/H200) with ``pip install 'dgserve[vllm]'``.
Random weights at the published shape (``models/real_shape.py``), so every canvas runs to a fixed
step cap (``--steps``): the figures are a worst case for the drafter, not its converged speed.
Sections, each in its own process (one failing or timing out still reports the others; GPU
memory is freed between them), each reporting its own peak GPU memory:

* ``env``: torch, CUDA device, transformers, vLLM;
* ``transformers_drafter``: ``models.drafter`` at the real shape (``--layers``, bf16): ms per
  denoising step, first-canvas latency and tokens/s at batch 1 and 4;
* ``vllm_diffusion``: vLLM's diffusion runner through ``models.vllm_backend.VLLMDiffusion``
  (``load_format=dummy``, bf16, eager): first-token latency and tokens/s at batch 1 and 4, and one
  verify-round canvas (seeded, position 0 pinned: it must come back pinned);
* ``vllm_ar``: vLLM AR decode of the same shape as ``Gemma4ForCausalLM`` (dummy weights): first
  token and tokens/s at batch 1 and 4, and one ``verify`` (prompt logprobs);
* ``triton_sampler``: the Triton sampler kernel against the torch reference at V = 262,144,
  C = 256 (agreement, ms, extra memory);
* ``tiny_parity``: the committed tiny checkpoint on both vLLM engines against the transformers
  backends: identical greedy AR tokens, and speculative rounds equal to AR greedy.

``--dry-run`` runs the same sections at a reduced shape on the CPU (Triton under
``TRITON_INTERPRET=1``) and reports the ones that need CUDA as ``needs_cuda``; CI runs it. The last
line of output is one JSON object: ``{"dry_run": ..., "sections": [{"section", "status", ...}]}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("env", "transformers_drafter", "vllm_diffusion", "vllm_ar", "triton_sampler", "tiny_parity")
NEEDS_VLLM = ("vllm_diffusion", "vllm_ar", "tiny_parity")
PROMPT = "Extract the city as JSON: we met in Rome."


def _shape(dry: bool):
    from models.architecture import ModelSpec
    from models.real_shape import REAL

    if not dry:
        return REAL
    return ModelSpec(vocab_size=2048, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 num_global_key_value_heads=1, global_head_dim=64, intermediate_size=256, num_experts=8,
                 top_k_experts=2, moe_intermediate_size=64, sliding_window=64, canvas_length=64,
                 max_position_embeddings=4096)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_peak(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def _gpu_used_gib() -> float | None:
    """Device memory in use (all processes: vLLM's engine core runs in its own)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
        return round(float(out.stdout.split()[0]) / 1024, 2)
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- sections (each runs in its own process) ----------------------------------------------------
def env(a) -> dict:
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": _cuda()}
    if _cuda():
        out["device"] = torch.cuda.get_device_name()
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import vllm

        out["vllm"] = vllm.__version__
    except ImportError:
        out["vllm"] = None
    return out


def transformers_drafter(a) -> dict:

    from models.drafter import DiffusionDrafter, DraftSettings
    from models.real_shape import load_real_shape
    from models.tokenizer import encode_prompt

    cuda = _cuda() and not a.dry_run
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    shape = _shape(a.dry_run)
    start = time.perf_counter()
    model, tok = load_real_shape(a.layers, dtype, 0, shape=shape, device=device)
    built_s = time.perf_counter() - start
    settings = DraftSettings(max_steps=a.steps, confidence_threshold=-1.0)  # a fixed step count
    drafter = DiffusionDrafter(model, tok, settings)
    prompt = encode_prompt(tok, PROMPT)
    canvas = drafter.canvas_length
    drafter.draft([prompt], max_new_tokens=canvas, seed=0)  # warm-up
    rows = []
    for batch in (1, 4):
        _gpu_peak(reset=True)
        _sync()
        t = time.perf_counter()
        drafts = drafter.draft([prompt] * batch, max_new_tokens=canvas, seed=1)
        _sync()
        total = time.perf_counter() - t
        steps = drafts[0].steps_per_canvas[0]
        rows.append({"batch": batch, "steps_per_canvas": steps,
                     "ms_per_step": round(1000 * total / steps, 2),
                     "first_canvas_ms": round(1000 * drafts[0].first_canvas_s, 1),
                     "tokens_per_s": round(batch * canvas / total, 1), "peak_gpu_gib": _gpu_peak()})
    return {"layers": a.layers, "vocab": shape.vocab_size, "canvas": canvas, "dtype": dtype,
            "build_s": round(built_s, 1), "rows": rows}


def _engine_rows(run_batch, batches=(1, 4)) -> list[dict]:
    rows = []
    for batch in batches:
        t = time.perf_counter()
        outs = asyncio.get_event_loop().run_until_complete(run_batch(batch))
        wall = time.perf_counter() - t
        tokens = sum(len(o.token_ids) for o in outs)
        rows.append({"batch": batch, "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
                     "first_token_p50_ms": round(1000 * statistics.median(o.first_token_s for o in outs), 1),
                     "wall_s": round(wall, 2)})
    return rows


def _start(cls, settings):
    """(event loop, engine, seconds to start it, detokenizer, the prompt's ids) for one engine."""
    from transformers import AutoTokenizer

    from models.tokenizer import encode_prompt

    tok = AutoTokenizer.from_pretrained(settings.model)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    t = time.perf_counter()
    engine = loop.run_until_complete(_build(cls, settings))
    return (loop, engine, round(time.perf_counter() - t, 1), lambda ids: tok.decode(list(ids), skip_special_tokens=True),
            encode_prompt(tok, PROMPT))


def vllm_diffusion(a) -> dict:
    from models.real_shape import write_checkpoint
    from models.vllm_backend import VLLMDiffusion

    ckpt = write_checkpoint(Path(tempfile.mkdtemp(prefix="dg-real-")), a.layers, config_only=True)
    loop, dg, start_s, detok, prompt = _start(VLLMDiffusion, _diffusion_settings(a, ckpt))
    loop.run_until_complete(dg.draft(prompt, dg.canvas_length, detok))  # warm-up
    rows = _engine_rows(lambda b: asyncio.gather(*(dg.draft(prompt, dg.canvas_length, detok) for _ in range(b))))
    canvas, _ = loop.run_until_complete(dg.draft_canvas(prompt, first_token=17, width=dg.canvas_length))
    used = _gpu_used_gib()
    dg.shutdown()
    return {"layers": a.layers, "steps_cap": a.steps, "engine_start_s": start_s, "rows": rows,
            "verify_canvas": {"tokens": len(canvas), "pinned_kept": bool(canvas) and canvas[0] == 17},
            "gpu_used_gib": used}


def _diffusion_settings(a, ckpt):
    from models.vllm_backend import VLLMSettings

    return VLLMSettings(model=str(ckpt), dtype="bfloat16", max_model_len=4096, max_num_seqs=4,
                        gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=True,
                        attention_backend="TRITON_ATTN", canvas_length=256, max_denoising_steps=a.steps,
                        language_model_only=True, extra={"load_format": "dummy"})


def _ar_settings(a, ckpt):
    from models.vllm_backend import VLLMSettings

    return VLLMSettings(model=str(ckpt), dtype="bfloat16", max_model_len=4096, max_num_seqs=16,
                        gpu_memory_utilization=a.gpu_memory_utilization, enforce_eager=True,
                        extra={"load_format": "dummy"})


async def _build(cls, settings):
    return cls.from_settings(settings)


def vllm_ar(a) -> dict:
    from models.export_ar import gemma4_text_config
    from models.real_shape import (
        real_config,
        real_generation_config,
        write_padded_tokenizer,
    )
    from models.vllm_backend import VLLMCausal

    ckpt = Path(tempfile.mkdtemp(prefix="dg-real-ar-"))
    write_padded_tokenizer(ckpt)
    gemma4_text_config(real_config(a.layers)).save_pretrained(ckpt)
    real_generation_config().save_pretrained(ckpt)
    loop, ar, start_s, detok, prompt = _start(VLLMCausal, _ar_settings(a, ckpt))
    loop.run_until_complete(ar.generate(prompt, 8, detok))
    rows = _engine_rows(lambda b: asyncio.gather(*(ar.generate(prompt, a.ar_tokens, detok) for _ in range(b))))
    v = loop.run_until_complete(ar.verify(prompt, [17] * 64))
    used = _gpu_used_gib()
    ar.shutdown()
    return {"layers": a.layers, "max_new_tokens": a.ar_tokens, "engine_start_s": start_s, "rows": rows,
            "verify": {"accepted": v.accepted, "correction": v.correction}, "gpu_used_gib": used}


def triton_sampler(a) -> dict:
    import torch

    from kernels import sampler, sampler_triton

    cuda = _cuda() and not a.dry_run
    dev = "cuda" if cuda else "cpu"
    vocab, canvas, hidden = (262_144, 256, 2_816) if cuda else (1024, 16, 64)
    dtype = torch.bfloat16 if cuda else torch.float32
    emb = torch.randn(vocab, hidden, device=dev, dtype=dtype)
    rows = []
    for batch in (1, 4):
        logits = torch.randn(batch, canvas, vocab, device=dev, dtype=dtype) * 4
        ref = sampler.position_stats(logits, 0.8, 1)
        tri = sampler_triton.position_stats(logits, 0.8, 1)
        soft_ref, soft_tri = sampler.soft_embedding(logits, emb), sampler_triton.soft_embedding(logits, emb)
        row = {"batch": batch, "argmax_equal": bool(torch.equal(ref.argmax, tri.argmax)),
               "sample_agree": round(float((ref.sample == tri.sample).float().mean()), 5),
               "entropy_max_abs_diff": float((ref.entropy.float() - tri.entropy.float()).abs().max()),
               "soft_embedding_max_abs_diff": float((soft_ref.float() - soft_tri.float()).abs().max())}
        for name, mod in (("reference", sampler), ("triton", sampler_triton)):
            _gpu_peak(reset=True)
            base = torch.cuda.memory_allocated() if cuda else 0
            _sync()
            t = time.perf_counter()
            mod.position_stats(logits, 0.8, 1)
            mod.soft_embedding(logits, emb)
            _sync()
            row[f"{name}_ms"] = round(1000 * (time.perf_counter() - t), 2)
            if cuda:
                row[f"{name}_extra_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
        rows.append(row)
    return {"vocab": vocab, "canvas": canvas, "device": dev, "interpreted": not cuda, "rows": rows}


def tiny_parity(a) -> dict:
    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT
    from models.speculative import speculate_rounds
    from models.tokenizer import encode_prompt
    from models.verifier import ARVerifier
    from models.vllm_backend import VLLMCausal, VLLMDiffusion, VLLMSettings

    ar_dir = export(DEFAULT_CHECKPOINT, Path(tempfile.mkdtemp()) / "dg-tiny-ar")
    ref = ARVerifier.from_pretrained(ar_dir, "causal", "cuda", "float32")
    detok = lambda ids: ref.tokenizer.decode(list(ids), skip_special_tokens=True)  # noqa: E731
    prompts = [encode_prompt(ref.tokenizer, q) for q in ("Describe Paris in a few words.", "Name a city as JSON.",
                                                         "Tell me about Oslo.", "What is a river?")]
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    common = dict(dtype="float32", max_model_len=2048, max_num_seqs=4, gpu_memory_utilization=0.2)
    ar = loop.run_until_complete(_build(VLLMCausal, VLLMSettings(model=str(ar_dir), **common)))
    dg = loop.run_until_complete(_build(VLLMDiffusion, VLLMSettings(model=str(DEFAULT_CHECKPOINT),
                                                                    attention_backend="TRITON_ATTN", **common)))
    same_ar = same_spec = 0
    for p in prompts:
        want = list(ref.generate([p], max_new_tokens=48)[0].token_ids)
        got = loop.run_until_complete(ar.generate(p, 48, detok))
        same_ar += list(got.token_ids) == want
        r = loop.run_until_complete(speculate_rounds(ar, dg.draft_canvas, p, 48, dg.canvas_length, detok))
        same_spec += list(r.token_ids) == want
    draft = loop.run_until_complete(dg.draft(prompts[0], 64, detok))
    ar.shutdown()
    dg.shutdown()
    return {"prompts": len(prompts), "ar_identical": same_ar, "speculative_identical": same_spec,
            "draft_text": draft.text[:80]}


RUNNERS = {f.__name__: f for f in (env, transformers_drafter, vllm_diffusion, vllm_ar, triton_sampler, tiny_parity)}


def run_section(name: str, a) -> dict:
    """Run one section here (the child process); what cannot run says why."""
    if a.dry_run and name in NEEDS_VLLM:
        out = {"status": "needs_cuda", "reason": "vLLM's diffusion runner and GPU engines need CUDA"}
        try:  # where vLLM is installed, the engine arguments this section would use must be valid
            from models.vllm_backend import check_diffusion_support

            check_diffusion_support()
            for settings in (_diffusion_settings(a, "/unused"), _ar_settings(a, "/unused")):
                settings.engine_args()
            out["engine_args_checked"] = True
        except ImportError:
            out["engine_args_checked"] = False
        return out
    if not a.dry_run and name != "env" and not _cuda():
        return {"status": "needs_cuda", "reason": "no CUDA device (use --dry-run on a CPU)"}
    if name in NEEDS_VLLM:
        try:
            import vllm  # noqa: F401
        except ImportError:
            return {"status": "needs_vllm", "reason": "pip install 'dgserve[vllm]'"}
    t = time.perf_counter()
    out = RUNNERS[name](a)
    return {"status": "ok", "seconds": round(time.perf_counter() - t, 1), **out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="reduced shape on the CPU (what CI runs)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--layers", type=int, default=None, help="default: 30 (the real depth); 2 with --dry-run")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps per canvas (default 8; 2 dry)")
    ap.add_argument("--ar-tokens", type=int, default=128)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--budget-s", type=float, default=470, help="no section starts after this")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # the child process' own section
    a = ap.parse_args(argv)
    a.layers = a.layers or (2 if a.dry_run else 30)
    a.steps = a.steps or (2 if a.dry_run else 8)
    if a.section:
        print(json.dumps({"section": a.section, **run_section(a.section, a)}))
        return 0
    start = time.monotonic()
    results = []
    for name in a.sections.split(","):
        left = a.budget_s - (time.monotonic() - start)
        if left <= 5:
            results.append({"section": name, "status": "skipped", "reason": "time budget spent"})
            continue
        cmd = [sys.executable, "-m", "bench.gpu_check", "--section", name, "--layers", str(a.layers),
               "--steps", str(a.steps), "--ar-tokens", str(a.ar_tokens),
               "--gpu-memory-utilization", str(a.gpu_memory_utilization)] + (["--dry-run"] if a.dry_run else [])
        env = dict(os.environ)
        if a.dry_run:
            env["TRITON_INTERPRET"] = "1"
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=left, env=env)
            last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
            try:
                result = json.loads(last)
            except ValueError:
                result = {"section": name, "status": "error", "returncode": p.returncode,
                          "error": (p.stderr or p.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            result = {"section": name, "status": "timeout", "after_s": round(left, 1)}
        results.append(result)
        print(f"[gpu_check] {name}: {result['status']}", file=sys.stderr, flush=True)
        if not a.json:
            print(json.dumps(result, indent=1))
    print(json.dumps({"dry_run": a.dry_run, "layers": a.layers, "steps": a.steps, "sections": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
