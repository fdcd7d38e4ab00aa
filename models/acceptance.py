"""The acceptance rule of speculative verification, greedy and sampled: one pure function each.

A **draft** of ``k`` tokens is proposed after a prefix; the verifier scores ``prefix + draft`` in
one forward, which gives its choice after ``prefix + draft[:i]`` for ``i = 0..k``. The **accepted
prefix** is what the verifier keeps of the draft; the **correction token** is the verifier's token
right after it (a replacement where the draft went wrong, or the bonus token after a fully
accepted draft). The output is the verifier's own: token for token its greedy decode, or, sampled,
distributed exactly as its sampling.

Greedy, worked example: draft ``[5, 9, 4]``, the verifier's greedy tokens after each prefix
``[5, 9, 7, 2]`` -> accepted 2 (``5, 9``), correction 7.

Sampled (speculative sampling with the draft as a deterministic proposal): draft token ``i`` is
kept with the verifier's probability ``p_i(draft[i])``; the first one rejected is replaced by a
draw from ``p_i`` with ``draft[i]`` removed (renormalised), and after a fully kept draft the
correction is a draw from ``p_k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Verification:
    accepted: int  # length of the accepted draft prefix
    correction: int | None  # the verifier's token right after it (None: the verifier gave none)


def greedy_acceptance(draft: Sequence[int], greedy: Sequence[int]) -> Verification:
    """``draft`` [k]; ``greedy`` [k + 1] (or [k] when the token after a whole draft is unknown):
    ``greedy[i]`` is the verifier's greedy token after ``prefix + draft[:i]``."""
    k = 0
    while k < len(draft) and draft[k] == greedy[k]:
        k += 1
    return Verification(k, greedy[k] if k < len(greedy) else None)


def sampled_acceptance(draft: Sequence[int], logits: torch.Tensor, temperature: float,
                       generator: torch.Generator) -> Verification:
    """``draft`` [k]; ``logits`` [k + 1, vocab]: the verifier's logits after ``prefix + draft[:i]``.
    Draws one uniform per kept token, then one multinomial (the order fixes the randomness)."""
    for i, token in enumerate(draft):
        p = torch.softmax(logits[i].float().cpu() / temperature, -1)
        if float(torch.rand((), generator=generator)) >= float(p[token]):
            p[token] = 0.0
            return Verification(i, int(torch.multinomial(p, 1, generator=generator)))
    p = torch.softmax(logits[len(draft)].float().cpu() / temperature, -1)
    return Verification(len(draft), int(torch.multinomial(p, 1, generator=generator)))
