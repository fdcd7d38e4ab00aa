import pytest

from bench.routing import GPU_LIKE, mixed, replay
from pipeline.route_estimates import PathEstimate, RouteEstimates, ShapeKey
from pipeline.router import Load, RequestShape, RouterPolicy, choose_route, eligible_paths

POLICY = RouterPolicy(kind="static", drafter_queue_threshold=4)
IDLE = Load(drafter_queue=0)


def route(structured=False, stream=False, temperature=1.0, requested="auto", load=IDLE, policy=POLICY):
    return choose_route(RequestShape(structured, stream, temperature, requested), load, policy)


def test_streaming_prose_goes_to_ar():
    d = route(stream=True)
    assert d.path == "ar" and "stream" in d.reason


def test_structured_goes_to_the_drafter_with_validation():
    d = route(structured=True)
    assert d.path == "diffusion" and "structured" in d.reason
    assert route(structured=True, stream=True).path == "diffusion"


def test_non_streaming_prose_goes_to_the_drafter():
    assert route().path == "diffusion"


def test_deep_drafter_queue_goes_to_ar():
    d = route(structured=True, load=Load(drafter_queue=5))
    assert d.path == "ar" and "queue 5 > threshold 4" in d.reason
    assert route(load=Load(drafter_queue=4)).path == "diffusion"


def test_unhealthy_drafter_goes_to_ar_even_when_requested():
    sick = Load(drafter_queue=0, drafter_healthy=False)
    assert route(load=sick).path == "ar"
    d = route(requested="verify", load=sick)
    assert d.path == "ar" and "out of rotation" in d.reason


@pytest.mark.parametrize("requested", ["ar", "diffusion", "verify"])
def test_explicit_override(requested):
    d = route(stream=True, requested=requested, load=Load(drafter_queue=99))
    assert d.path == requested and d.reason == "requested by the client"


def test_greedy_prose_policy_and_header():
    policy = RouterPolicy(kind="static", greedy_prose_route="verify")
    assert route(temperature=0, policy=policy).path == "verify"
    assert route(temperature=0.7, policy=policy).path == "diffusion"
    assert route().header().startswith("diffusion; reason=")


# -- the measured policy ------------------------------------------------------------------------
MEASURED = RouterPolicy()

# This machine's embedded default (bench.models / bench.concurrency): AR ~0.14 s per extraction
# answer, +~45 ms per request in flight (continuous batching); the drafter ~0.30 s, +~0.15 s per
# request in flight; the verify route ~0.5 s. First chunk: AR's first token ~20 ms, a canvas = the
# whole answer.
CPU_LIKE = {"ar": PathEstimate(0.14, 0.045, 0.02), "diffusion": PathEstimate(0.30, 0.15, 0.30),
            "verify": PathEstimate(0.50, 0.25, 0.12)}

# The published H100 figures: bench/routing.py says where each number comes from.


def measured(estimates, structured=False, stream=False, in_flight=0, policy=MEASURED):
    return choose_route(RequestShape(structured, stream, 0.0, max_tokens=256), Load(0, True, in_flight), policy,
                        estimates)


def test_cpu_like_profile_chooses_ar_everywhere():
    for structured in (False, True):
        for stream in (False, True):
            for n in (0, 7, 15):
                d = measured(CPU_LIKE, structured, stream, n)
                assert d.path == "ar", (structured, stream, n, d.reason)
    d = measured(CPU_LIKE, structured=True)
    assert d.reason.startswith("predicted 140 ms vs diffusion 300 ms vs verify 500 ms (measured, 0 in flight)")
    assert dict((p, s) for p, s, _ in d.predicted) == {"ar": 0.14, "diffusion": 0.30, "verify": 0.50}


def test_gpu_like_profile_chooses_diffusion_until_the_crossover():
    assert measured(GPU_LIKE, structured=True).path == "diffusion"
    assert measured(GPU_LIKE).path == "diffusion"  # non-streamed prose
    assert measured(GPU_LIKE, structured=True, in_flight=7).path == "diffusion"
    assert measured(GPU_LIKE, structured=True, in_flight=8).path == "ar"
    assert measured(GPU_LIKE, in_flight=31).path == "ar"
    # prose streams: AR's first token (53 ms) beats the drafter's first canvas (489 ms)
    d = measured(GPU_LIKE, stream=True)
    assert d.path == "ar" and d.reason.startswith("predicted first chunk 53 ms (end 1300 ms) vs diffusion 489 ms")
    # a structured stream is one validated chunk: the sooner end wins
    assert measured(GPU_LIKE, structured=True, stream=True).path == "diffusion"


def test_a_path_under_the_agreement_floor_is_not_chosen():
    low = dict(GPU_LIKE, diffusion=PathEstimate(0.49, 0.1225, 0.489, agreement=0.42, agreement_samples=5))
    d = measured(low, structured=True)
    assert d.path == "verify" and "diffusion agreement 0.42 < 0.8" in d.reason
    few = dict(GPU_LIKE, diffusion=PathEstimate(0.49, 0.1225, 0.489, agreement=0.42, agreement_samples=2))
    assert measured(few, structured=True).path == "diffusion"  # 2 < min_agreement_samples: not yet trusted


def test_hard_rules_come_before_measurement():
    shape = RequestShape(True, False, 0.0, requested="verify")
    assert choose_route(shape, Load(0), MEASURED, GPU_LIKE).reason == "requested by the client"
    d = choose_route(RequestShape(True, False, 0.0), Load(0, drafter_healthy=False), MEASURED, GPU_LIKE)
    assert d.path == "ar" and "out of rotation" in d.reason


def test_nothing_measured_falls_back_to_the_static_rules():
    d = measured({}, structured=True)
    assert d.path == "diffusion" and d.reason.endswith("(static rule: nothing measured yet)")


def test_estimates_learn_the_load_line_and_decay():
    est = RouteEstimates(decay=0.95)
    key = ShapeKey.of(True, False, 64)
    for n in range(8):  # y = 0.1 + 0.05 n
        for _ in range(3):
            est.observe("ar", key, n, 0.1 + 0.05 * n, 0.01)
    e = est.estimate("ar", key)
    assert abs(e.base_s - 0.1) < 0.01 and abs(e.per_in_flight_s - 0.05) < 0.005
    assert e.source == "measured" and abs(e.seconds(4) - 0.3) < 0.02
    # one load only: the slope is serial queueing (every request ahead costs one service time)
    est.observe("diffusion", key, 0, 0.3, None, calibration=True)
    d = est.estimate("diffusion", key)
    assert d.source == "calibrated" and abs(d.base_s - 0.3) < 1e-6 and abs(d.per_in_flight_s - 0.3) < 1e-6
    # newer observations outweigh older ones
    for _ in range(60):
        est.observe("diffusion", key, 0, 0.6, None)
    assert abs(est.estimate("diffusion", key).base_s - 0.6) < 0.03


def test_estimates_fall_back_to_the_nearest_shape():
    est = RouteEstimates()
    est.observe("ar", ShapeKey.of(False, False, 256), 0, 0.5, 0.02)
    streamed = est.estimate("ar", ShapeKey.of(False, True, 64))
    assert streamed is not None and abs(streamed.first_chunk_s - 0.02) < 1e-6
    assert est.estimate("ar", ShapeKey.of(True, False, 256)) is None  # prose says nothing of structured
    est.observe_agreement("diffusion", ShapeKey.of(True, False, 64), 0.5)
    est.observe("diffusion", ShapeKey.of(True, False, 64), 0, 0.3, None)
    assert est.estimate("diffusion", ShapeKey.of(True, True, 64)).agreement == 0.5
    assert est.estimate("ar", ShapeKey.of(False, False, 64)).agreement == 1.0  # the reference


def test_a_greedy_only_verify_route_is_not_chosen_for_sampled_requests():
    fast_verify = dict(GPU_LIKE, verify=PathEstimate(0.1, 0.01, 0.05))
    greedy, sampled = RequestShape(True, False, 0.0), RequestShape(True, False, 0.7)
    apart, together = eligible_paths(sampled, True, False), eligible_paths(sampled, True, True)
    assert apart == ("ar", "diffusion") and together == ("ar", "diffusion", "verify")
    assert eligible_paths(greedy, True, False) == together and eligible_paths(sampled, False, True) == ("ar",)
    assert choose_route(greedy, Load(0), MEASURED, fast_verify, eligible_paths(greedy, True, False)).path == "verify"
    d = choose_route(sampled, Load(0), MEASURED, fast_verify, apart)
    assert d.path == "diffusion" and "verify" not in d.reason and {p for p, _, _ in d.predicted} == set(apart)
    assert choose_route(sampled, Load(0), MEASURED, fast_verify, together).path == "verify"
    # the static rules too: a verify prose route becomes diffusion where verify cannot sample
    static = RouterPolicy(kind="static", prose_route="verify")
    prose = RequestShape(False, False, 0.7)
    d = choose_route(prose, Load(0), static, None, eligible_paths(prose, True, False))
    assert d.path == "diffusion" and d.reason.endswith("verify cannot serve it here")
    # a route the client names is honoured (the verify route answers a sampled request with a 400)
    named = RequestShape(False, False, 0.7, requested="verify")
    assert choose_route(named, Load(0), MEASURED, fast_verify, apart).path == "verify"


def test_the_benchmarks_replay_turns_to_ar_beyond_the_crossover():
    items = mixed(10)  # 4 structured, 4 prose, 2 streamed prose
    mixes = {r["concurrency"]: r["mix"] for r in replay(items, (1, 8, 16))}
    assert mixes[1] == {"structured->diffusion": 4, "prose->diffusion": 4, "stream->ar": 2}
    assert mixes[8] == mixes[1]  # 7 others in flight: still under the crossover (~7.4)
    assert mixes[16] == {"structured->ar": 4, "prose->ar": 4, "stream->ar": 2}
