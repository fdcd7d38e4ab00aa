import pytest

from pipeline.router import Load, RequestShape, RouterPolicy, choose_route

POLICY = RouterPolicy(drafter_queue_threshold=4)
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
    policy = RouterPolicy(greedy_prose_route="verify")
    assert route(temperature=0, policy=policy).path == "verify"
    assert route(temperature=0.7, policy=policy).path == "diffusion"
    assert route().header().startswith("diffusion; reason=")
