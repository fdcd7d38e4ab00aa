"""The denoising sampler step: torch reference.

Words used across the project (defined once here):

* **canvas**: the block of ``canvas_length`` token positions the decoder denoises together.
* **step**: one decoder forward over the canvas plus the sampler update below.
* **accept**: keep a position's sampled token for the next step; **renoise**: replace it by a
  uniform random token. Every non-accepted position is renoised each step; accepted ones are not
  frozen (they may change at the next step), exactly as in transformers' ``EntropyBoundSampler``.
* **commit**: when denoising stops, the canvas's argmax becomes output and the next canvas starts.

Entropy-bound acceptance (arXiv 2505.24857): sort positions by entropy ``H`` ascending and accept
the first ``k`` with ``sum(H_1..H_k) - H_k <= bound``. Worked example with bound 0.1 and entropies
``[0.02, 0.5, 0.05, 0.04]``: sorted ``[0.02, 0.04, 0.05, 0.5]``, cumulative minus current
``[0, 0.02, 0.06, 0.11]``, so positions 0, 3, 2 are accepted and position 1 is renoised. The
lowest-entropy position is always accepted, so every step makes progress.

Ops (each backend implements them with the same signature; ``kernels/dispatch.py`` picks one and
runs the whole step):

* ``position_stats(logits, temperature, seed)``: per canvas position, over the vocabulary, the
  log-sum-exp, entropy, argmax and a Gumbel-max sample of ``softmax(logits / temperature)`` with
  the stateless RNG of ``kernels/rng.py``;
* ``soft_embedding(logits, embedding)``: ``softmax(logits) @ embedding``, the self-conditioning
  input.

This module is the readable reference: it materialises several float32 ``[batch, canvas, vocab]``
tensors. ``kernels/sampler_cpu.py`` streams over the vocabulary in chunks (O(batch x canvas) extra
memory beyond one chunk) and ``kernels/sampler_triton.py`` does one pass per position on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import rng


@dataclass(frozen=True)
class PositionStats:
    argmax: torch.Tensor  # [batch, canvas] long
    sample: torch.Tensor  # [batch, canvas] long, Gumbel-max draw from softmax(logits / T)
    entropy: torch.Tensor  # [batch, canvas] float32, nats
    lse: torch.Tensor  # [batch, canvas] float32, log-sum-exp of logits / T


@dataclass(frozen=True)
class SamplerStep:
    sample: torch.Tensor  # [batch, canvas] long
    argmax: torch.Tensor  # [batch, canvas] long
    entropy: torch.Tensor  # [batch, canvas] float32, nats
    accepted: torch.Tensor  # [batch, canvas] bool
    canvas: torch.Tensor  # [batch, canvas] long, the next step's input (accepted or renoised)


def gumbel_index(shape: tuple[int, int, int], device) -> torch.Tensor:
    """The RNG counter of every (row, position, token): ``(b * canvas + c) * vocab + v``."""
    b, c, v = shape
    return torch.arange(b * c * v, device=device, dtype=torch.int64).view(b, c, v)


def position_stats(logits: torch.Tensor, temperature: float = 1.0, seed: int = 0) -> PositionStats:
    """Reference: logits [batch, canvas, vocab] (any float dtype; masked entries may be -inf)."""
    x = logits.float() / temperature
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse.unsqueeze(-1)
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)
    b, c, v = x.shape
    index = gumbel_index((1, c, v), x.device)  # one batch row at a time keeps the int64 counters small
    sample = torch.stack([(x[i] + rng.gumbel(seed, index[0] + i * c * v)).argmax(-1) for i in range(b)])
    return PositionStats(x.argmax(-1), sample, entropy, lse)


def soft_embedding(logits: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """Reference: softmax(logits [batch, canvas, vocab]) @ embedding [vocab, hidden], in float32."""
    return torch.softmax(logits.float(), dim=-1) @ embedding.float()


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last axis, in float32. Masked (very negative)
    logits contribute zero."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def entropy_bound_accept(entropy: torch.Tensor, bound: float) -> torch.Tensor:
    """Accepted mask [batch, canvas] for per-position entropies [batch, canvas]."""
    sorted_h, order = torch.sort(entropy, dim=-1)
    keep_sorted = (torch.cumsum(sorted_h, dim=-1) - sorted_h) <= bound
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
