"""Stateless counter-based random numbers, identical in torch and in Triton.

``uniform(seed, index)`` is a pure function of two integers: no generator state travels between
steps or devices, so every backend of the sampler draws the same Gumbel noise for the same
``(seed, offset + position * vocab + token)``. The hash is the 32-bit integer finalizer
``x ^= x >> 16; x *= 0x45d9f3b`` (twice, then a last xor-shift), computed in int64 with explicit
32-bit masking so that no product overflows (a 32-bit value times a 27-bit constant < 2**59).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MULT = 0x45D9F3B
GOLDEN = 0x9E3779B9


def hash32(x: torch.Tensor) -> torch.Tensor:
    """int64 tensor of 32-bit values -> their 32-bit hashes (int64)."""
    x = x & MASK32
    x = (((x >> 16) ^ x) * MULT) & MASK32
    x = (((x >> 16) ^ x) * MULT) & MASK32
    return (x >> 16) ^ x


def uniform(seed: int, index: torch.Tensor) -> torch.Tensor:
    """float32 uniform in (0, 1) for each int64 ``index`` (24 bits of resolution)."""
    h = hash32(hash32(index) ^ ((seed * GOLDEN) & MASK32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def gumbel(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise: argmax(logits / T + gumbel) is a sample from softmax(logits / T)."""
    return -torch.log(-torch.log(uniform(seed, index)))


def random_tokens(seed: int, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform token ids in [0, vocab_size) for each ``index`` (the renoise draw)."""
    h = hash32(hash32(index ^ 0x5BD1E995) ^ ((seed * GOLDEN) & MASK32))
    return h % vocab_size
