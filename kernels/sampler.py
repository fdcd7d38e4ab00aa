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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplerStep:
    sample: torch.Tensor  # [batch, canvas] long, drawn from softmax(logits)
    argmax: torch.Tensor  # [batch, canvas] long
    entropy: torch.Tensor  # [batch, canvas] float32, nats
    accepted: torch.Tensor  # [batch, canvas] bool
    canvas: torch.Tensor  # [batch, canvas] long, the next step's input (accepted or renoised)


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


def sampler_step(logits: torch.Tensor, canvas: torch.Tensor, entropy_bound: float,
                 generator: torch.Generator | None = None) -> SamplerStep:
    """One sampler update from (already temperature-scaled and masked) ``logits`` [batch, canvas,
    vocab]: sample, argmax, entropy-bound acceptance, renoise of the rest."""
    vocab = logits.shape[-1]
    probs = torch.softmax(logits.float(), dim=-1)
    sample = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).view(canvas.shape)
    argmax = logits.argmax(-1)
    entropy = token_entropy(logits)
    accepted = entropy_bound_accept(entropy, entropy_bound)
    noise = torch.randint(0, vocab, canvas.shape, generator=generator, device=canvas.device)
    return SamplerStep(sample, argmax, entropy, accepted, torch.where(accepted, sample, noise))
