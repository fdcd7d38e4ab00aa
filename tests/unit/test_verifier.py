import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import tasks
from models.evaluate import schema_valid
from models.tokenizer import encode_prompt

EXAMPLES = list(tasks.examples("eval", 21, 12))


@pytest.fixture(scope="module")
def greedy_cases(verifier):
    """(prompt ids, AR greedy continuation) for a few held-out prompts."""
    prompts = [encode_prompt(verifier.tokenizer, e.instruction) for e in EXAMPLES]
    gens = verifier.generate(prompts, max_new_tokens=40)
    return [(p, list(g.token_ids)) for p, g in zip(prompts, gens)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_verify_accepts_greedy_and_stops_at_the_first_corruption(verifier, greedy_cases, data):
    prompt, greedy = data.draw(st.sampled_from(greedy_cases))
    n = data.draw(st.integers(1, len(greedy)))
    draft = greedy[:n]
    # a draft equal to AR's greedy continuation is fully accepted; the next token is AR's next greedy
    accepted, nxt = verifier.verify(prompt, draft)
    assert accepted == n
    expected_next = greedy[n] if n < len(greedy) else None
    if expected_next is not None:
        assert nxt == expected_next
    # corrupt position k: accepted_len == k and next_token is AR's greedy token there
    k = data.draw(st.integers(0, n - 1))
    wrong = data.draw(st.integers(0, verifier.lm.model.config.text_config.vocab_size - 1).filter(
        lambda t: t != draft[k]))
    corrupted = draft[:k] + [wrong] + draft[k + 1:]
    assert verifier.verify(prompt, corrupted) == (k, greedy[k])


def test_stream_yields_the_same_tokens_as_generate(verifier, greedy_cases):
    prompt, greedy = greedy_cases[0]
    assert list(verifier.stream(prompt, max_new_tokens=40)) == greedy


def test_batched_generation_equals_one_by_one(verifier, greedy_cases):
    single = [list(verifier.generate([p], max_new_tokens=40)[0].token_ids) for p, _ in greedy_cases[:4]]
    assert single == [g for _, g in greedy_cases[:4]]


def test_ar_greedy_answers_validate(verifier):
    exs = [e for e in EXAMPLES if e.kind == "json"]
    gens = verifier.generate([encode_prompt(verifier.tokenizer, e.instruction) for e in exs], 128)
    valid = sum(schema_valid(g.text, e.schema) for g, e in zip(gens, exs))
    assert valid >= 0.8 * len(exs)


def test_logits_processor_and_sampling(verifier, greedy_cases):
    prompt, greedy = greedy_cases[0]
    banned = greedy[0]

    def ban(generated, logits):
        logits = logits.clone()
        logits[banned] = float("-inf")
        return logits

    out = verifier.generate([prompt], max_new_tokens=5, logits_processors=[ban])[0]
    assert out.token_ids[0] != banned
    a = verifier.generate([prompt], max_new_tokens=10, temperature=1.0, seed=5)[0]
    b = verifier.generate([prompt], max_new_tokens=10, temperature=1.0, seed=5)[0]
    assert a.token_ids == b.token_ids


def test_separate_causal_checkpoint_gives_the_same_logits_and_tokens(verifier, greedy_cases, tmp_path):
    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT
    from models.verifier import ARVerifier

    other = ARVerifier.from_pretrained(export(DEFAULT_CHECKPOINT, tmp_path / "ar"), source="causal", device="cpu")
    prompt, greedy = greedy_cases[1]
    x = torch.tensor([prompt])
    m = torch.ones_like(x, dtype=torch.bool)
    with torch.inference_mode():
        a = verifier.lm.logits(x, m, 0, verifier.lm.new_cache())
        b = other.lm.logits(x, m, 0, other.lm.new_cache())
    assert torch.allclose(a, b, atol=1e-4)
    assert list(other.generate([prompt], max_new_tokens=40)[0].token_ids) == greedy
    assert other.verify(prompt, greedy[:5]) == verifier.verify(prompt, greedy[:5])


def test_bad_inputs_are_refused(verifier):
    with pytest.raises(ValueError):
        verifier.verify([], [1])
    with pytest.raises(ValueError):
        verifier.generate([[2, 3]], max_new_tokens=0)
    with pytest.raises(ValueError):
        type(verifier).from_pretrained(source="nope")


def test_speculative_with_a_separate_causal_verifier_equals_its_greedy(drafter, tmp_path):
    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT
    from models.speculative import SpeculativeDecoder
    from models.verifier import ARVerifier

    other = ARVerifier.from_pretrained(export(DEFAULT_CHECKPOINT, tmp_path / "ar"), source="causal", device="cpu")
    spec = SpeculativeDecoder(drafter, other, draft_steps=4)
    assert not spec.shared
    for ex in EXAMPLES[:5]:
        prompt = encode_prompt(drafter.tokenizer, ex.instruction)
        out = spec.generate(prompt, 64, seed=0)
        assert out.token_ids == other.generate([prompt], 64)[0].token_ids
        assert out.verifier_forwards == out.drafts + 1


def test_rounds_against_a_verifier_in_another_service_equal_its_greedy(drafter, tmp_path):
    """The verify route when the verifier is the Verifier deployment: ``draft_canvas`` (prefix
    encoded afresh per round) + the verifier service's ``next_token``/``verify`` (``TransformersAR`` over a
    separate causal checkpoint, what the deployment wraps), over ``RoundSpeculation``."""
    import asyncio

    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT
    from models.verifier import ARVerifier
    from pipeline.backends.transformers import TransformersAR
    from pipeline.errors import BadRequest
    from pipeline.interfaces import Job
    from pipeline.speculation import RoundSpeculation, threaded_draft_canvas

    other = ARVerifier.from_pretrained(export(DEFAULT_CHECKPOINT, tmp_path / "ar"), source="causal", device="cpu")
    rounds = RoundSpeculation(drafter.tokenizer, threaded_draft_canvas(drafter), TransformersAR(other), drafter.canvas_length)
    for ex in EXAMPLES[:4]:
        job = Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=48)
        want = other.generate([encode_prompt(drafter.tokenizer, ex.instruction)], 48)[0]
        got = asyncio.run(rounds.speculate(job))
        assert got.text == want.text and got.completion_tokens == len(want.token_ids)
        assert got.finished == want.finished
        st = got.stats
        assert st.verifier_forwards == st.drafts + 1 and st.denoising_steps >= st.drafts

    async def chunks():
        return [c async for c in rounds.speculate_stream(job)]

    streamed = asyncio.run(chunks())
    assert "".join(c.text for c in streamed) == want.text == streamed[-1].result.text
    with pytest.raises(BadRequest, match="greedy only"):
        asyncio.run(rounds.speculate(Job(messages=job.messages, prompt=None, max_tokens=8, temperature=0.5)))


def test_speculative_same_weights_shares_one_cache(drafter, verifier):
    from models.speculative import SpeculativeDecoder

    spec = SpeculativeDecoder(drafter, verifier)
    assert spec.shared
    prompt = encode_prompt(drafter.tokenizer, EXAMPLES[0].instruction)
    out = spec.generate(prompt, 3, seed=0)
    assert len(out.token_ids) <= 3 and out.token_ids == verifier.generate([prompt], 3)[0].token_ids


def test_verify_route_equals_ar_greedy_on_50_prompts(drafter, verifier):
    from models.speculative import SpeculativeDecoder

    spec = SpeculativeDecoder(drafter, verifier, draft_steps=2)
    accepted = []
    for i, ex in enumerate(tasks.examples("eval", 71, 50)):
        prompt = encode_prompt(drafter.tokenizer, ex.instruction)
        out = spec.generate(prompt, 64, seed=i)
        assert out.token_ids == verifier.generate([prompt], 64)[0].token_ids, ex.instruction
        accepted.extend(out.accepted)
    assert sum(accepted) / len(accepted) > 1  # drafts do get accepted beyond the pinned token


def test_vanishing_temperature_decodes_greedily(verifier):
    prompt = [2, 40, 41, 42]
    greedy = verifier.generate([prompt], max_new_tokens=8, temperature=0.0)[0].token_ids
    for t in (5e-324, 1e-12, 1e-5):
        assert verifier.generate([prompt], max_new_tokens=8, temperature=t, seed=1)[0].token_ids == greedy


def test_sampled_verification_draws_from_the_verifiers_distribution(drafter, verifier):
    """temperature > 0: each emitted token is accepted with the verifier's probability or redrawn
    without it, so 2-token answers follow AR sampling's exact distribution (checked on every
    sequence with probability >= 5%, within 4 standard errors of N draws), seeds are reproducible,
    and the greedy answer is not forced."""
    from collections import Counter

    from models.speculative import SpeculativeDecoder

    spec = SpeculativeDecoder(drafter, verifier, draft_steps=2)
    prompt = encode_prompt(drafter.tokenizer, "Describe Paris in a few words.")
    temperature, n = 1.5, 300
    got = Counter(spec.generate(prompt, 2, seed=s, temperature=temperature).token_ids for s in range(n))

    @torch.inference_mode()
    def dist(prefix):
        ids = torch.tensor([prefix])
        logits = verifier.lm.logits(ids, torch.ones_like(ids, dtype=torch.bool), 0, verifier.lm.new_cache())
        return torch.softmax(logits[0, -1] / temperature, -1)

    p1 = dist(prompt)
    firsts = torch.topk(p1, 8).indices.tolist()
    exact = {(a, b): float(p1[a] * q) for a in firsts for b, q in enumerate(dist(prompt + [a]).tolist())}
    likely = {seq: p for seq, p in exact.items() if p >= 0.05}
    assert len(likely) >= 2, "the test needs a spread distribution"
    for seq, p in likely.items():
        f = got[seq] / n
        assert abs(f - p) <= 4 * (p * (1 - p) / n) ** 0.5 + 0.01, (seq, f, p)
    greedy = tuple(verifier.generate([prompt], 2)[0].token_ids)
    assert got[greedy] < n  # sampling, not greedy
    assert spec.generate(prompt, 12, seed=5, temperature=1.0).token_ids == \
        spec.generate(prompt, 12, seed=5, temperature=1.0).token_ids
