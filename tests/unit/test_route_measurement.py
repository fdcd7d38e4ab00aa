"""The measured router over the real tiny backends, in process: calibration seeds the estimates,
shadow verification measures the drafter's agreement with AR, requests are routed by prediction
and their costs update the estimates."""

import asyncio

import pytest

from pipeline.assemble import transformers_roles
from pipeline.backends.transformers import TransformersDrafter
from pipeline.orchestrator import Pipeline
from pipeline.route_estimates import ShapeKey, calibration_jobs
from pipeline.router import RequestShape, RouterPolicy
from pipeline.validation import RegistryValidator


@pytest.fixture(scope="module")
def calibrated(drafter, verifier):
    roles = transformers_roles(drafter, verifier)
    pipe = Pipeline(roles.drafter, roles.ar, RegistryValidator(),
                    RouterPolicy(shadow_share=1.0, explore_share=0.0))
    asyncio.run(pipe.calibrate(calibration_jobs(32), 1))
    return pipe


STRUCTURED = ShapeKey.of(True, False, 32)


def test_calibration_measures_every_path_and_the_drafters_agreement(calibrated):
    est = calibrated.estimates
    assert est.observed == 9  # 3 paths x 3 calibration requests (warm-ups unrecorded)
    for path in ("ar", "diffusion", "verify"):
        for key in (STRUCTURED, ShapeKey.of(False, False, 32), ShapeKey.of(False, True, 32)):
            e = est.estimate(path, key)
            assert e is not None and e.source == "calibrated" and 0 < e.base_s < 30, (path, key, e)
    d = est.estimate("diffusion", STRUCTURED)
    assert d.agreement is not None and 0.0 <= d.agreement <= 1.0 and d.agreement_samples >= 1  # the warm-up answer counts for quality
    assert est.estimate("ar", STRUCTURED).agreement == 1.0
    rows = est.snapshot()
    assert {r["path"] for r in rows} == {"ar", "diffusion", "verify"} and len(rows) == 9


def test_requests_are_routed_by_prediction_and_update_the_estimates(calibrated):
    shape = RequestShape(True, False, 0.0, max_tokens=32)
    decision = calibrated.route(shape)
    predicted = {p: s for p, s, _ in decision.predicted}
    assert set(predicted) == {"ar", "diffusion", "verify"}
    assert decision.path == min(predicted, key=predicted.get)
    assert decision.reason.startswith("predicted ") and "(calibrated, 0 in flight)" in decision.reason
    job, _ = calibration_jobs(32)[0]
    before = calibrated.estimates.observed
    out = asyncio.run(calibrated.run(job, decision))
    assert out.stats.validated
    assert calibrated.estimates.observed == before + 1
    assert calibrated.estimates.estimate(decision.path, STRUCTURED).source == "measured"


def test_exploration_sends_a_share_to_the_least_recently_measured_path(drafter, verifier):
    roles = transformers_roles(drafter, verifier)
    pipe = Pipeline(roles.drafter, roles.ar, RegistryValidator(), RouterPolicy(explore_share=0.5))
    key = ShapeKey.of(False, False, 64)
    for path, seconds in (("ar", 0.1), ("diffusion", 0.3), ("verify", 0.5)):
        pipe.estimates.observe(path, key, 0, seconds, None)
    shape = RequestShape(False, False, 0.0, max_tokens=64)
    first, second = pipe.route(shape), pipe.route(shape)
    assert first.path == "ar" and not first.explored
    assert second.explored and second.path in ("diffusion", "verify") and second.reason.startswith("exploring ")


def test_sampled_requests_skip_a_verify_route_that_runs_in_rounds(drafter, verifier):
    from pipeline.speculation import RoundSpeculation, threaded_draft_canvas

    together = transformers_roles(drafter, verifier)
    assert together.drafter.sampled_verify
    rounds = RoundSpeculation(drafter.tokenizer, threaded_draft_canvas(drafter, None), None, drafter.canvas_length)
    apart = Pipeline(TransformersDrafter(drafter, None, None, rounds), together.ar, RegistryValidator(),
                     RouterPolicy(explore_share=0.0))
    assert not apart.drafter.sampled_verify
    key = ShapeKey.of(False, False, 64)
    for path, seconds in (("ar", 0.5), ("diffusion", 0.3), ("verify", 0.1)):
        apart.estimates.observe(path, key, 0, seconds, None)
    assert apart.route(RequestShape(False, False, 0.0, max_tokens=64)).path == "verify"
    sampled = apart.route(RequestShape(False, False, 0.8, max_tokens=64))
    assert sampled.path == "diffusion" and "verify" not in sampled.reason
