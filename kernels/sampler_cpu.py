"""Memory-lean sampler ops: one streaming pass over the vocabulary in chunks.

Per position the pass keeps running statistics of ``x = logits / T`` (online softmax):
``m`` (max so far), ``s = sum exp(x - m)``, ``t = sum exp(x - m) * x``, the argmax and the best
``x + gumbel``; when a chunk raises the max, ``s`` and ``t`` are rescaled by ``exp(m_old - m_new)``.
At the end ``lse = m + log s`` and ``entropy = lse - t / s``. Extra memory is O(batch x canvas x
chunk) for the chunk in flight (sized by :func:`auto_chunk`), not O(batch x canvas x vocab). Same signatures as
``kernels/sampler.py``.
"""

from __future__ import annotations

import torch

from . import rng
from .sampler import PositionStats

TEMP_ELEMENTS = 1 << 19  # elements per temporary (2 MiB in float32): the memory the step may add
ROW_GROUP = 256  # positions per group in soft_embedding, bounding its [rows, hidden] accumulators


def auto_chunk(rows: int, vocab: int) -> int:
    """Vocabulary chunk so that a [rows, chunk] temporary holds about TEMP_ELEMENTS elements."""
    return max(128, min(vocab, TEMP_ELEMENTS // max(1, rows)))


def position_stats(logits: torch.Tensor, temperature: float = 1.0, seed: int = 0,
                   chunk: int | None = None) -> PositionStats:
    b, c, v = logits.shape
    chunk = chunk or auto_chunk(b * c, v)
    dev = logits.device
    m = torch.full((b, c), float("-inf"), device=dev)
    s = torch.zeros((b, c), device=dev)
    t = torch.zeros((b, c), device=dev)
    best = torch.full((b, c), float("-inf"), device=dev)
    argmax = torch.zeros((b, c), dtype=torch.long, device=dev)
    best_noisy = torch.full((b, c), float("-inf"), device=dev)
    sample = torch.zeros((b, c), dtype=torch.long, device=dev)
    row = (torch.arange(b * c, device=dev, dtype=torch.int64) * v).view(b, c, 1)
    for start in range(0, v, chunk):
        x = logits[..., start:start + chunk].float() / temperature  # [b, c, k]
        k = x.shape[-1]
        cmax, carg = x.max(-1)
        new_m = torch.maximum(m, cmax)
        finite = torch.isfinite(new_m)
        scale = torch.where(finite, torch.exp(m - new_m), torch.zeros_like(m))
        e = torch.where(finite.unsqueeze(-1), torch.exp(x - new_m.unsqueeze(-1)), torch.zeros_like(x))
        s = s * scale + e.sum(-1)
        t = t * scale + torch.where(e > 0, e * x, torch.zeros_like(x)).sum(-1)
        m = new_m
        better = cmax > best
        best = torch.where(better, cmax, best)
        argmax = torch.where(better, carg + start, argmax)
        idx = row + start + torch.arange(k, device=dev, dtype=torch.int64)
        nmax, narg = (x + rng.gumbel(seed, idx)).max(-1)
        nbetter = nmax > best_noisy
        best_noisy = torch.where(nbetter, nmax, best_noisy)
        sample = torch.where(nbetter, narg + start, sample)
        del x, e, idx
    lse = m + torch.log(s)
    return PositionStats(argmax, sample, lse - t / s, lse)


def soft_embedding(logits: torch.Tensor, embedding: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """softmax(logits) @ embedding without the [batch, canvas, vocab] probabilities: per group of
    positions and per vocabulary chunk, ``acc = acc * exp(m_old - m_new) + exp(x - m_new) @ E[chunk]``,
    then ``acc / s``."""
    b, c, v = logits.shape
    hidden = embedding.shape[-1]
    dev = logits.device
    flat = logits.reshape(b * c, v)
    out = torch.empty((b * c, hidden), device=dev)
    chunk = chunk or max(128, min(v, TEMP_ELEMENTS // hidden))
    for r0 in range(0, b * c, ROW_GROUP):
        rows = flat[r0:r0 + ROW_GROUP]
        m = torch.full((rows.shape[0], 1), float("-inf"), device=dev)
        s = torch.zeros((rows.shape[0], 1), device=dev)
        acc = torch.zeros((rows.shape[0], hidden), device=dev)
        for start in range(0, v, chunk):
            x = rows[:, start:start + chunk].float()
            new_m = torch.maximum(m, x.amax(-1, keepdim=True))
            finite = torch.isfinite(new_m)  # a chunk of masked (-inf) logits adds nothing
            scale = torch.where(finite, torch.exp(m - new_m), torch.zeros_like(m))
            e = torch.where(finite, torch.exp(x - new_m), torch.zeros_like(x))
            s = s * scale + e.sum(-1, keepdim=True)
            acc.mul_(scale).addmm_(e, embedding[start:start + chunk].float())
            m = new_m
        out[r0:r0 + ROW_GROUP] = acc / s
    return out.view(b, c, hidden)
