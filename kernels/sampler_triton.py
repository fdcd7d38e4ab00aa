"""Triton sampler ops: one program per canvas position streams over the vocabulary once.

Same online statistics as ``kernels/sampler_cpu.py`` and the same stateless hash as
``kernels/rng.py`` (int64 arithmetic with 32-bit masking), so the three backends agree. Runs on
CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests). Same signatures as
``kernels/sampler.py``.
"""

from __future__ import annotations

import os

import torch

from . import rng
from .sampler import PositionStats

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU default does not need Triton
    triton = None


def available() -> bool:
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _hash32(x):
        x = x & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
        return (x >> 16) ^ x

    @triton.jit
    def _stats_kernel(logits_ptr, argmax_ptr, sample_ptr, entropy_ptr, lse_ptr, V, temperature, seed_mix,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * V
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        t = tl.zeros([], tl.float32)
        best = tl.full([], float("-inf"), tl.float32)
        best_arg = tl.zeros([], tl.int64)
        best_noisy = tl.full([], float("-inf"), tl.float32)
        noisy_arg = tl.zeros([], tl.int64)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            valid = offs < V
            x = tl.load(logits_ptr + base + offs, mask=valid, other=float("-inf")).to(tl.float32) / temperature
            cmax = tl.max(x, 0)
            new_m = tl.maximum(m, cmax)
            finite = new_m > float("-inf")
            ref = tl.where(finite, new_m, 0.0)  # avoids -inf - -inf while everything is masked
            scale = tl.where(finite, tl.exp(m - ref), 0.0)
            e = tl.where(finite, tl.exp(x - ref), 0.0)
            s = s * scale + tl.sum(e, 0)
            t = t * scale + tl.sum(e * tl.where(e > 0, x, 0.0), 0)
            m = new_m
            carg = tl.argmax(x, 0).to(tl.int64) + start
            better = cmax > best
            best_arg = tl.where(better, carg, best_arg)
            best = tl.where(better, cmax, best)
            h = _hash32(_hash32(base + offs) ^ seed_mix)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            noisy = tl.where(valid, x - tl.log(-tl.log(u)), float("-inf"))
            nmax = tl.max(noisy, 0)
            narg = tl.argmax(noisy, 0).to(tl.int64) + start
            nbetter = nmax > best_noisy
            noisy_arg = tl.where(nbetter, narg, noisy_arg)
            best_noisy = tl.where(nbetter, nmax, best_noisy)
        lse = m + tl.log(s)
        tl.store(argmax_ptr + row, best_arg)
        tl.store(sample_ptr + row, noisy_arg)
        tl.store(entropy_ptr + row, lse - t / s)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _soft_embedding_kernel(logits_ptr, emb_ptr, out_ptr, V, H, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_H)
        hmask = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V).to(tl.int64)
            valid = offs < V
            x = tl.load(logits_ptr + row * V + offs, mask=valid, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, tl.max(x, 0))
            finite = new_m > float("-inf")
            ref = tl.where(finite, new_m, 0.0)
            scale = tl.where(finite, tl.exp(m - ref), 0.0)
            e = tl.where(finite, tl.exp(x - ref), 0.0)
            emb = tl.load(emb_ptr + offs[:, None] * H + cols[None, :], mask=valid[:, None] & hmask[None, :],
                          other=0.0).to(tl.float32)
            acc = acc * scale + tl.sum(e[:, None] * emb, 0)
            s = s * scale + tl.sum(e, 0)
            m = new_m
        tl.store(out_ptr + row * H + cols, acc / s, mask=hmask)


def _block(v: int, cap: int = 4096) -> int:
    return min(cap, triton.next_power_of_2(v))


def position_stats(logits: torch.Tensor, temperature: float = 1.0, seed: int = 0) -> PositionStats:
    if not available():
        raise RuntimeError("Triton sampler needs CUDA or TRITON_INTERPRET=1")
    b, c, v = logits.shape
    x = logits.contiguous()
    rows = b * c
    dev = logits.device
    argmax = torch.empty(rows, dtype=torch.int64, device=dev)
    sample = torch.empty(rows, dtype=torch.int64, device=dev)
    entropy = torch.empty(rows, dtype=torch.float32, device=dev)
    lse = torch.empty(rows, dtype=torch.float32, device=dev)
    seed_mix = (seed * rng.GOLDEN) & rng.MASK32
    _stats_kernel[(rows,)](x, argmax, sample, entropy, lse, v, float(temperature), seed_mix, BLOCK=_block(v))
    shape = (b, c)
    return PositionStats(argmax.view(shape), sample.view(shape), entropy.view(shape), lse.view(shape))


def soft_embedding(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    if not available():
        raise RuntimeError("Triton sampler needs CUDA or TRITON_INTERPRET=1")
    b, c, v = logits.shape
    h = embedding.shape[-1]
    out = torch.empty((b * c, h), dtype=torch.float32, device=logits.device)
    block_h = triton.next_power_of_2(h)
    block_v = max(16, min(1024, 32768 // block_h))
    _soft_embedding_kernel[(b * c,)](logits.contiguous(), embedding.contiguous(), out, v, h,
                                     BLOCK_V=block_v, BLOCK_H=block_h)
    return out.view(b, c, h)
