"""The orchestration in-process over the real tiny backends (no Ray)."""

import asyncio
import json
import time
from dataclasses import replace

import pytest
from jsonschema.validators import validator_for

from models import tasks
from pipeline.assemble import transformers_roles
from pipeline.errors import OutputInvalid
from pipeline.health import DrafterHealth
from pipeline.interfaces import Constraint, Job, Stats, TextResult
from pipeline.orchestrator import Pipeline, StructuredPolicy
from pipeline.router import RequestShape, RouteDecision, RouterPolicy
from pipeline.streaming import StopScanner, cut_at_stop
from pipeline.validation import RegistryValidator


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class BrokenDrafter:
    """A drafter replica that fails (a fake backend, as a dead replica would behave)."""

    def __init__(self):
        self.calls = 0

    async def draft(self, job):
        self.calls += 1
        raise RuntimeError("replica died")

    speculate = draft


@pytest.fixture(scope="module")
def backends(drafter, verifier):
    roles = transformers_roles(drafter, verifier)
    return roles.drafter, roles.ar, RegistryValidator()


def job_for(ex, constraint=True, max_tokens=128):
    c = Constraint("json_schema", ex.schema) if constraint and ex.schema else None
    return Job(messages=(("user", ex.instruction),), prompt=None, max_tokens=max_tokens, temperature=0.0,
               seed=1, constraint=c)


def run(coro):
    return asyncio.run(coro)


def test_structured_answers_always_validate(backends):
    pipe = Pipeline(*backends)
    for ex in tasks.examples("eval", 51, 8, kind="json"):
        out = run(pipe.run(job_for(ex), RouteDecision("diffusion", "test")))
        validator_for(ex.schema)(ex.schema).validate(json.loads(out.result.text))
        assert out.stats.validated is True and out.stats.draft_valid is not None


def test_repair_reuses_the_good_part_of_a_draft(backends):
    _, ar, _ = backends
    ex = tasks.example("eval", 52, 0, kind="json")
    broken = ex.target[: len(ex.target) // 2] + "@@@"
    repaired = run(ar.repair(job_for(ex), TextResult(broken, 0, 0, False)))
    validator_for(ex.schema)(ex.schema).validate(json.loads(repaired.text))
    assert repaired.stats.repair_reused_tokens > 0
    assert repaired.text.startswith(ex.target[: len(ex.target) // 3])


def test_unsatisfiable_output_is_422_never_a_success(backends):
    pipe = Pipeline(*backends, structured=StructuredPolicy("error"))
    # the classic puzzle with a 1 where its one solution has a 4: no row, column or box repeats a
    # digit (the request is accepted), but no board completes it, so the masks cannot find one
    puzzle = "531070000600195000098000060800060003400803001700020006060000280000419005000080079"
    job = Job(messages=(("user", "Solve: " + puzzle),), prompt=None, max_tokens=90, constraint=Constraint("sudoku", puzzle))
    with pytest.raises(OutputInvalid) as e:
        run(pipe.run(job, RouteDecision("diffusion", "test")))
    assert e.value.status == 422 and "(cause: other)" in e.value.message  # decoded under the masks


def _rejection(backends, schema, max_tokens) -> tuple[str, Stats]:
    pipe = Pipeline(*backends)
    job = Job(messages=(("user", "Answer as JSON."),), prompt=None, max_tokens=max_tokens, temperature=0.0,
              constraint=Constraint("json_schema", schema))
    stats = Stats()
    with pytest.raises(OutputInvalid) as e:
        run(pipe.run(job, RouteDecision("diffusion", "test"), stats=stats))
    return e.value.message, stats


def test_an_answer_cut_at_the_budget_is_retried_under_the_minimal_schema(backends):
    # 10 tokens: the schema's answer (free strings up to 32 characters, optional keys) runs past them
    schema = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string"}, "city": {"type": "string"}, "notes": {"type": "string"}}}
    job = Job(messages=(("user", "Name a person as JSON."),), prompt=None, max_tokens=10, temperature=0.0, seed=0,
              constraint=Constraint("json_schema", schema))
    stats = Stats()
    out = run(Pipeline(*backends).run(job, RouteDecision("diffusion", "test"), stats=stats))
    validator_for(schema)(schema).validate(json.loads(out.result.text))
    assert stats.fallback_used and stats.retries == 1 and stats.retry_used == "minimal schema"
    assert stats.validated and stats.rejection_cause is None
    stats = Stats()
    with pytest.raises(OutputInvalid, match="budget_exhausted"):  # with retries off it is a 422
        run(Pipeline(*backends, structured=StructuredPolicy("fallback", 0)).run(
            job, RouteDecision("diffusion", "test"), stats=stats))


def test_a_rejection_names_its_cause(backends):
    # 12 tokens cannot hold a 60-character string: the constrained answer is cut at the budget
    long = {"type": "object", "properties": {"a": {"type": "string", "minLength": 60}}, "required": ["a"]}
    message, stats = _rejection(backends, long, 12)
    assert "(cause: budget_exhausted)" in message and stats.rejection_cause == "budget_exhausted"
    assert stats.repair_used and stats.fallback_used and stats.retries == 1  # and the minimal schema
    # only "a" is allowed and two unique items are required: the grammar cannot say "unique"
    unique = {"type": "array", "items": {"enum": ["a"]}, "minItems": 2, "uniqueItems": True}
    message, stats = _rejection(backends, unique, 32)
    assert "(cause: validator_only_keyword)" in message and stats.rejection_cause == "validator_only_keyword"
    assert stats.retries == 3  # the minimal schema, then sampled answers: none can be unique


def test_failing_drafter_is_served_by_ar_and_leaves_rotation(backends):
    _, ar, validator = backends
    clock = Clock()
    broken = BrokenDrafter()
    pipe = Pipeline(broken, ar, validator, health=DrafterHealth(max_failures=1, cooldown_s=5, clock=clock))
    ex = tasks.example("eval", 53, 0, kind="prose")
    first = pipe.route(RequestShape(False, False, 1.0))
    assert first.path == "diffusion"
    out = run(pipe.run(job_for(ex), first))
    assert out.decision.path == "ar" and "drafter failed" in out.decision.reason and out.result.text
    assert pipe.route(RequestShape(False, False, 1.0)).path == "ar"
    clock.now = 6.0  # cool-down over: the next request probes the drafter again
    assert pipe.route(RequestShape(False, False, 1.0)).path == "diffusion"


class SilentDrafter:
    """A drafter replica that takes the request and never answers (a hung or vanished replica the
    handle keeps waiting on)."""

    async def draft(self, job):
        await asyncio.sleep(3600)

    speculate = draft


def test_a_drafter_that_never_answers_is_given_up_in_time_for_ar(backends):
    _, ar, validator = backends
    health = DrafterHealth(max_failures=1, cooldown_s=5)
    pipe = Pipeline(SilentDrafter(), ar, validator, RouterPolicy(drafter_deadline_share=0.5), health)
    ex = tasks.example("eval", 53, 1, kind="json")
    job = replace(job_for(ex), deadline=time.time() + 20)
    start = time.monotonic()
    out = run(pipe.run(job, RouteDecision("diffusion", "test")))
    assert 10 <= time.monotonic() - start < 20  # half the deadline went to the drafter, the rest to AR
    assert out.decision.path == "ar" and "no answer within" in out.decision.reason
    assert out.stats.drafter_error == "timeout" and out.stats.validated is True
    assert not health.healthy()  # counted against the drafter: the next requests go to AR


def test_a_route_the_client_named_keeps_the_whole_deadline(backends):
    drafter, ar, validator = backends

    class SlowDrafter:  # answers, after more than half the deadline
        async def draft(self, job):
            await asyncio.sleep(4.0)
            return await drafter.draft(job)

    pipe = Pipeline(SlowDrafter(), ar, validator, RouterPolicy(drafter_deadline_share=0.5))
    decision = pipe.route(RequestShape(structured=True, stream=False, temperature=0.0, requested="diffusion"))
    assert decision.requested
    ex = tasks.example("eval", 53, 2, kind="json")
    out = run(pipe.run(replace(job_for(ex), deadline=time.time() + 7.0), decision))
    assert out.decision.path == "diffusion" and out.stats.drafter_error is None


def test_verify_route_equals_ar_greedy(backends):
    pipe = Pipeline(*backends)
    for ex in tasks.examples("eval", 54, 4):
        job = job_for(ex, constraint=False, max_tokens=64)
        a = run(pipe.run(job, RouteDecision("verify", "test")))
        b = run(pipe.run(job, RouteDecision("ar", "test")))
        assert a.result.text == b.result.text
        assert a.stats.drafts >= 1 and a.stats.mean_accepted >= 1


def test_streams_end_with_the_full_result(backends):
    pipe = Pipeline(*backends)
    ex = tasks.example("eval", 55, 0, kind="prose")

    async def collect(path):
        return [c async for c in pipe.stream(job_for(ex, max_tokens=80), RouteDecision(path, "test"))]

    for path in ("ar", "diffusion", "verify"):
        chunks = run(collect(path))
        assert chunks[-1].result is not None
        assert "".join(c.text for c in chunks[:-1]) == chunks[-1].result.text
    assert len(run(collect("ar"))) > 3


def test_stop_sequences():
    assert cut_at_stop("a. b. c", [". c", "b"]) == ("a. ", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    s = StopScanner(["END"])
    out = "".join(s.push(p) for p in ["he", "llo E", "N", "D more"])
    assert out == "hello " and s.stopped


class BrokenAR:
    async def generate(self, job):
        raise RuntimeError("verifier replica died")

    repair = generate

    async def stream(self, job):
        raise RuntimeError("verifier replica died")
        yield  # pragma: no cover


def test_failing_verifier_is_a_clean_503(backends):
    from pipeline.errors import Unavailable

    drafter, _, validator = backends
    pipe = Pipeline(drafter, BrokenAR(), validator)
    ex = tasks.example("eval", 56, 0, kind="prose")
    with pytest.raises(Unavailable) as e:
        run(pipe.run(job_for(ex), RouteDecision("ar", "test")))
    assert e.value.status == 503 and e.value.retry_after

    async def drain():
        return [c async for c in pipe.stream(job_for(ex), RouteDecision("ar", "test"))]

    with pytest.raises(Unavailable):
        run(drain())
