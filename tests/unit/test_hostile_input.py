"""Everything a schema or a body drives is bounded: depth, finiteness, forced text, deadlines, and
work stuck past its deadline is seen by the breaker."""

import asyncio
import json
import threading
import time

import pytest

from models.grammar import GrammarEngine
from models.tokenizer import EOS_ID, PAD_ID
from pipeline.assemble import local_pipeline
from pipeline.errors import DeadlineExceeded
from pipeline.gateway import MAX_BODY_DEPTH, Gateway, Limits, json_depth
from pipeline.health import DrafterHealth, WorkTracker, watch
from pipeline.interfaces import Constraint, Job, Stats
from pipeline.router import RequestShape
from pipeline.validation import ConstraintError, check_finite

RECURSIVE = {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                             "required": ["next"]}}, "$ref": "#/$defs/n"}


@pytest.fixture(scope="module")
def grammar(drafter, verifier):
    return GrammarEngine(verifier.tokenizer, drafter.vocab_size, EOS_ID, PAD_ID)


@pytest.fixture(scope="module")
def gateway(drafter, verifier):
    return Gateway(local_pipeline(drafter, verifier), "dgserve-tiny", Limits(max_tokens=64, default_max_tokens=32))


def chat_raw(schema_text: str) -> bytes:
    return ('{"model":"dgserve-tiny","messages":[{"role":"user","content":"x"}],"response_format":'
            '{"type":"json_schema","json_schema":{"name":"x","schema":' + schema_text + '}}}').encode()


def deep_text(levels: int) -> str:
    """A schema nested ``levels`` objects deep, as text (json.dumps itself recurses too deep)."""
    return '{"type":"object","properties":{"a":' * levels + "{}" + '},"required":["a"]}' * levels


def test_the_issue_schemas_are_400s_within_two_seconds(gateway):
    for raw, fragment in [(chat_raw(json.dumps(RECURSIVE)), "no finite instance"),
                          (chat_raw(deep_text(2000)), "nests"), (chat_raw(deep_text(450)), "nests"),
                          (chat_raw(deep_text(30)), "nesting depth")]:
        start = time.perf_counter()
        reply = asyncio.run(gateway.chat(raw))
        assert time.perf_counter() - start < 2
        assert reply.status == 400, reply.body
        assert fragment in reply.body["error"]["message"]


def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": [1, {"b": "]]"}]}') == 3
    assert json_depth(b'"[[[\\"[["') == 0
    assert json_depth(b"[[[]]]") == 3
    assert json_depth(b"") == 0
    assert json_depth(("[" * (MAX_BODY_DEPTH + 1) + "]" * (MAX_BODY_DEPTH + 1)).encode()) == MAX_BODY_DEPTH + 1


@pytest.mark.parametrize("schema, cycle", [
    (RECURSIVE, "#/$defs/n/properties/next"),
    ({"type": "object", "properties": {"a": {"type": "array", "minItems": 1, "items": {"$ref": "#"}}},
      "required": ["a"]}, "#/properties/a/items"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"$ref": "#"}]}}, "required": ["a"]}, "#/properties/a"),
    ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "false"),
])
def test_schemas_without_a_finite_instance_are_refused_naming_why(schema, cycle):
    with pytest.raises(ConstraintError, match="instance") as e:
        check_finite(schema)
    assert cycle in str(e.value)


@pytest.mark.parametrize("schema", [
    {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"$ref": "#"}}}, "required": ["a"]},
    {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # any non-object is an instance
    {"type": ["object", "null"], "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
])
def test_recursive_schemas_with_a_finite_instance_pass(schema):
    check_finite(schema)


def test_forced_text_is_bounded_where_xgrammar_would_never_return(grammar):
    hook = grammar.canvas_hook("json_schema", RECURSIVE, 64)
    start = time.perf_counter()
    pins = hook.pins(0, [])
    assert time.perf_counter() - start < 1
    assert 0 < len(pins) <= 64
    assert grammar.tokenizer.decode(list(pins.values())).startswith('{"next":{"next":')


def test_forced_text_equals_xgrammars_on_finite_grammars(grammar):
    from models import tasks

    for ex in list(tasks.examples("eval", 7, 40, kind="json")):
        m = grammar.matcher("json_schema", ex.schema)
        assert grammar.forced_text(m, 10_000) == m.native.fork().find_jump_forward_string()


def test_a_draft_past_its_deadline_leaves_the_batch_at_the_next_step(drafter, verifier):
    from models.tokenizer import encode_prompt

    prompts = [encode_prompt(drafter.tokenizer, "Describe Oslo in a few words.")] * 2
    drafts = drafter.draft(prompts, max_new_tokens=256, seed=0, deadlines=[time.time() - 1, None])
    assert drafts[0].expired and drafts[0].steps_per_canvas == (1,)
    assert not drafts[1].expired
    g = verifier.generate(prompts[:1], max_new_tokens=64, deadline=time.time() - 1)[0]
    assert g.expired and g.token_ids == ()


def test_no_stage_starts_after_the_deadline(drafter, verifier):
    pipe = local_pipeline(drafter, verifier)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    job = Job(messages=(("user", "Extract the name as JSON."),), prompt=None, max_tokens=32,
              constraint=Constraint("json_schema", schema), deadline=time.time() + 0.05)
    decision = pipe.route(RequestShape(structured=True, stream=False, temperature=0.0))
    stats = Stats()
    with pytest.raises(DeadlineExceeded):
        asyncio.run(pipe.run(job, decision, [], stats))
    assert stats.expired or stats.validated is None


def test_work_stuck_past_its_deadline_is_reported_and_fails_the_health_check():
    work = WorkTracker(grace_s=0.05)
    release = threading.Event()

    def stuck_step():  # a native call that ignores the deadline
        with work.track(time.time() - 1):
            release.wait(5)

    t = threading.Thread(target=stuck_step)
    t.start()
    try:
        time.sleep(0.05)
        status = work.status()
        assert status.in_flight == 1 and status.stuck == 1 and status.oldest_overrun_s >= 1
        with pytest.raises(RuntimeError, match="past their deadline"):
            work.check()
    finally:
        release.set()
        t.join()
    assert work.status().stuck == 0
    work.check()


def test_the_breaker_takes_a_stuck_drafter_out_of_rotation(drafter, verifier):
    work = WorkTracker(grace_s=0.0)
    health = DrafterHealth(cooldown_s=60)
    pipe = local_pipeline(drafter, verifier, health=health, work=work)
    gateway = Gateway(pipe, "dgserve-tiny")

    async def scenario():
        async def status():
            return work.status()

        watcher = asyncio.create_task(watch(status, health, period_s=0.01))
        with work.track(time.time() - 1):
            await asyncio.sleep(0.1)
            shape = RequestShape(structured=True, stream=False, temperature=0.0)
            decision = pipe.route(shape)
            body = gateway.health().body
        watcher.cancel()
        return decision, body

    decision, body = asyncio.run(scenario())
    assert decision.path == "ar" and "rotation" in decision.reason
    assert body["drafter_in_rotation"] is False and body["drafter_stuck_jobs"] == 1


def test_fuzz_campaign_every_case_is_a_valid_200_or_a_clear_4xx_within_its_limit():
    """A bounded slice of ``python -m bench.schema_fuzz`` (docs/reliability.md has a longer run).
    The deadline and the per-case limit (1.5 s / 2.0 s) are in this machine's time: on a machine
    slower than the one they were set on they scale with its measured AR pace."""
    from bench.schema_fuzz import campaign, in_process_gateway

    result = campaign(in_process_gateway(), cases=60, seed=0)
    assert result.cases == 60
    assert result.failures == [], result.failures
    assert result.invalid_success == 0 and result.over_limit == 0
    assert all(s.startswith("2") or s.startswith("4") for s in result.by_status), result.by_status
    assert len(result.by_status) >= 3, result.by_status  # the schemas reach several outcomes
    assert result.rss_growth_mb < 300, result.rss_growth_mb
