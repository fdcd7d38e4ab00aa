import math

import torch

from kernels.dispatch import sampler_step
from kernels.sampler import entropy_bound_accept, token_entropy


def two_way_logits(p: float) -> list[float]:
    """Logits over a 4-token vocabulary with mass p on token 0 and 1-p on token 1."""
    return [math.log(p), math.log(1 - p), -1e9, -1e9]


def h2(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_entropy_matches_closed_form_and_ignores_masked_tokens():
    logits = torch.tensor([[two_way_logits(0.9), [0.0, 0.0, 0.0, 0.0]]])
    h = token_entropy(logits)
    assert torch.allclose(h, torch.tensor([[h2(0.9), math.log(4)]]), atol=1e-5)
    assert torch.isfinite(h).all()


def test_entropy_bound_worked_example():
    # bound 0.1, entropies [0.02, 0.5, 0.05, 0.04]: sorted cumulative-minus-current is
    # [0, 0.02, 0.06, 0.11], so positions 0, 3, 2 are accepted and position 1 is renoised.
    accepted = entropy_bound_accept(torch.tensor([[0.02, 0.5, 0.05, 0.04]]), 0.1)
    assert accepted.tolist() == [[True, False, True, True]]


def test_lowest_entropy_position_is_always_accepted():
    accepted = entropy_bound_accept(torch.tensor([[3.0, 2.0, 4.0]]), 0.1)
    assert accepted.tolist() == [[False, True, False]]


def test_sampler_step_keeps_confident_positions_and_renoises_the_rest():
    # position 0: p=0.9 on token 0 (H = 0.325); positions 1, 2: uniform (H = log 4 = 1.386).
    # Sorted cumulative-minus-current: [0, 0.325, 1.711]: only position 0 is within the bound 0.1
    uniform = [0.0, 0.0, 0.0, 0.0]
    logits = torch.tensor([[two_way_logits(0.9), uniform, uniform]])
    canvas = torch.tensor([[3, 3, 3]])
    seen_noise = set()
    for seed in range(50):
        st = sampler_step(logits, canvas, 0.1, seed=seed)
        assert st.accepted.tolist() == [[True, False, False]]
        assert st.argmax[0, 0] == 0
        assert st.canvas[0, 0] == st.sample[0, 0]
        seen_noise.add(int(st.canvas[0, 1]))
    assert len(seen_noise) > 1  # renoised positions draw uniform tokens


def test_second_position_is_accepted_when_the_first_is_confident():
    # H = [0.008, 1.386]: the second's cumulative-minus-current is 0.008 <= 0.1, so both are kept.
    logits = torch.tensor([[two_way_logits(0.999), [0.0, 0.0, 0.0, 0.0]]])
    st = sampler_step(logits, torch.tensor([[3, 3]]), 0.1, seed=0)
    assert st.accepted.tolist() == [[True, True]]


def test_the_acceptance_rule_worked_examples():
    import torch

    from models.acceptance import Verification, greedy_acceptance, sampled_acceptance

    assert greedy_acceptance([5, 9, 4], [5, 9, 7, 2]) == Verification(2, 7)
    assert greedy_acceptance([5, 9], [5, 9, 3]) == Verification(2, 3)  # bonus token
    assert greedy_acceptance([5, 9], [5, 9]) == Verification(2, None)  # none known after the draft
    assert greedy_acceptance([], [8]) == Verification(0, 8)
    # sampled: a token the verifier is sure of is always kept; one it rules out never is
    sure = torch.full((3, 4), -1e9)
    sure[0, 2] = sure[1, 1] = sure[2, 3] = 0.0
    gen = torch.Generator().manual_seed(0)
    assert sampled_acceptance([2, 1], sure, 1.0, gen) == Verification(2, 3)
    assert sampled_acceptance([0, 1], sure, 1.0, gen) == Verification(0, 2)
