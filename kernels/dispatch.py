"""Which sampler backend runs, and the whole sampler step over it.

The backends (``kernels/sampler.py``, the torch reference; ``kernels/sampler_cpu.py``, chunked;
``kernels/sampler_triton.py``, one pass per position on the GPU) share one signature and import
only the reference's result types, so selection lives here, above all three (no import circle).
"""

from __future__ import annotations

import os

import torch

from . import rng
from .sampler import SamplerStep, entropy_bound_accept, position_stats, soft_embedding

BACKENDS = ("reference", "chunked", "triton")


def select_backend(device: torch.device | str = "cpu") -> str:
    """``DGSERVE_SAMPLER_BACKEND`` if set; else Triton on CUDA when it imports, chunked on CPU."""
    forced = os.environ.get("DGSERVE_SAMPLER_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DGSERVE_SAMPLER_BACKEND must be one of {BACKENDS}, got {forced!r}")
        return forced
    if torch.device(device).type == "cuda":
        from .sampler_triton import available

        if available():
            return "triton"
    return "chunked"


def ops(backend: str):
    """(position_stats, soft_embedding) of a backend."""
    if backend == "reference":
        return position_stats, soft_embedding
    if backend == "chunked":
        from . import sampler_cpu

        return sampler_cpu.position_stats, sampler_cpu.soft_embedding
    if backend == "triton":
        from . import sampler_triton

        return sampler_triton.position_stats, sampler_triton.soft_embedding
    raise ValueError(f"unknown sampler backend {backend!r}; expected one of {BACKENDS}")


def sampler_step(logits: torch.Tensor, canvas: torch.Tensor, entropy_bound: float, seed: int,
                 temperature: float = 1.0, backend: str = "reference") -> SamplerStep:
    """One sampler update: Gumbel-max sample, argmax, entropy-bound acceptance, renoise of the
    rest (uniform tokens from the stateless RNG). ``logits`` [batch, canvas, vocab]."""
    stats = ops(backend)[0](logits, temperature, seed)
    accepted = entropy_bound_accept(stats.entropy, entropy_bound)
    positions = torch.arange(canvas.numel(), device=canvas.device, dtype=torch.int64).view(canvas.shape)
    noise = rng.random_tokens(seed, positions, logits.shape[-1])
    return SamplerStep(stats.sample, stats.argmax, stats.entropy, accepted,
                       torch.where(accepted, stats.sample, noise))
