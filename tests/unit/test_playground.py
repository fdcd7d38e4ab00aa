"""The playground's trace (pipeline/watch.py) without Ray: a watched run goes through the same
pipeline as a chat completion and reports what each stage saw."""

import asyncio
import json

import pytest
import torch

from pipeline.assemble import local_pipeline
from pipeline.gateway import Gateway, Limits
from pipeline.validation import JsonSchemaValidator

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def gateway(drafter, verifier):
    return Gateway(local_pipeline(drafter, verifier), "dgserve-tiny", Limits(max_tokens=96), playground=True)


def body(route="diffusion", seed=1, schema=SCHEMA, **extra):
    out = {"model": "dgserve-tiny", "messages": [{"role": "user", "content": "Extract: Ana Lopez is 34 years old."}],
           "route": route, "max_tokens": 64, "seed": seed, "temperature": 0, **extra}
    if schema is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    return out


def watched(gateway, b, headers=None) -> tuple[int, list[tuple[str, dict]]]:
    async def go():
        reply = await gateway.playground_run(json.dumps(b).encode(), headers or {})
        if reply.stream is None:
            return reply.status, [("error", reply.body)]
        events = []
        async for frame in reply.stream:
            head, data = frame.decode().rstrip("\n").split("\n")
            assert head.startswith("event: ") and data.startswith("data: ")
            events.append((head[7:], json.loads(data[6:])))
        return reply.status, events

    return asyncio.run(go())


def of(events, kind):
    return [e for k, e in events if k == kind]


def test_a_watched_run_is_the_chat_completion_with_its_trace(gateway):
    """Same answer as /v1/chat/completions for the same request, and every diffusion stage reported:
    the route first, each denoising step (argmax canvas, acceptances, entropies), the commit, the
    verdicts, the stage timings, then the final completion."""
    status, events = watched(gateway, body())
    assert status == 200
    assert events[0][0] == "route" and events[0][1]["path"] == "diffusion"
    assert events[-1][0] == "final"
    chat = asyncio.run(gateway.chat(json.dumps(body()).encode()))
    final = events[-1][1]
    assert final["choices"] == chat.body["choices"] and final["usage"] == chat.body["usage"]
    steps = of(events, "step")
    draft = of(events, "draft")[0]
    assert len(steps) == draft["stats"]["denoising_steps"] > 1
    n = len(steps[0]["tokens"])
    assert n == gateway.pipeline.drafter.drafter.canvas_length
    assert all(len(s["accepted"]) == len(s["entropy"]) == n for s in steps)
    assert all(e >= 0 for s in steps for e in s["entropy"])
    assert sum(steps[-1]["accepted"]) > sum(steps[0]["accepted"])  # the canvas settles
    assert [s["step"] for s in steps if s["canvas"] == 0] == list(range(draft["stats"]["canvas_steps"][0]))
    assert "".join(e["text"] for e in of(events, "commit")) == draft["text"]
    stages = [e["name"] for e in of(events, "stage")]
    assert stages[:2] == ["draft", "validate draft"]
    assert all(e["start"] <= e["end"] <= final["t"] for e in of(events, "stage"))
    verdicts = of(events, "verdict")
    assert verdicts[0]["of"] == "draft" and verdicts[0]["text"] == draft["text"]
    assert verdicts[-1]["ok"] and verdicts[-1]["text"] == final["choices"][0]["message"]["content"]


def test_an_invalid_draft_shows_its_error_spans_and_the_repair(gateway):
    """A draft the validator refuses: its verdict points at the failing characters, and the repair
    reports the prefix it kept and what AR added (together: the repaired answer)."""
    for seed in range(1, 9):
        status, events = watched(gateway, body(seed=seed))
        draft_verdict = of(events, "verdict")[0]
        if not draft_verdict["ok"]:
            break
    else:
        pytest.fail("no draft of seeds 1-8 failed validation")
    text = draft_verdict["text"]
    assert draft_verdict["spans"] and all(0 <= a < b for a, b in draft_verdict["spans"])
    expected = JsonSchemaValidator().validate(SCHEMA, text)
    assert draft_verdict["spans"] == [list(s) for s in expected.spans] and draft_verdict["errors"] == list(expected.errors)
    repair = of(events, "repair")[0]
    assert repair["draft"] == text and text.startswith(repair["kept"])
    repaired = of(events, "verdict")[1]
    assert repaired["of"] == "repair" and repaired["text"] == repair["kept"] + repair["added"]
    assert [e["name"] for e in of(events, "stage")][:3] == ["draft", "validate draft", "repair"]


def test_verify_rounds_report_accepted_text_and_corrections(gateway):
    status, events = watched(gateway, body(route="verify", schema=None, max_tokens=24))
    assert status == 200 and events[-1][0] == "final"
    rounds = of(events, "rounds")[0]
    answer = events[-1][1]["choices"][0]["message"]["content"]
    assert len(rounds["accepted"]) == len(rounds["texts"]) == len(rounds["corrections"]) >= 1
    assert "".join(rounds["texts"]) == answer
    # a round's correction token is where the next round starts
    for correction, nxt in zip(rounds["corrections"], rounds["texts"][1:]):
        assert nxt.startswith(correction)


def test_ar_runs_and_errors_are_traced(gateway):
    status, events = watched(gateway, body(route="ar"))
    assert [k for k, _ in events] == ["route", "stage", "stage", "verdict", "final"]
    assert of(events, "stage")[0]["name"] == "generate" and of(events, "verdict")[0]["of"] == "ar"
    status, events = watched(gateway, body(max_tokens=4096))
    assert status == 400 and "max_tokens" in events[0][1]["error"]["message"]


def test_the_playground_is_off_unless_enabled_and_needs_the_key(gateway):
    off = Gateway(gateway.pipeline, "dgserve-tiny", gateway.limits)
    assert watched(off, body())[0] == 404
    locked = Gateway(gateway.pipeline, "dgserve-tiny", gateway.limits, api_key="s3cret", playground=True)
    assert watched(locked, body())[0] == 401
    assert watched(locked, body(route="ar"), {"authorization": "Bearer s3cret"})[0] == 200


def test_watching_a_draft_does_not_change_it(drafter):
    """The step callback sees every step of every row and the drafts are the same without it."""
    from models.tokenizer import encode_prompt

    prompts = [encode_prompt(drafter.tokenizer, p) for p in ("Describe Oslo.", "Name a colour.")]
    seen = []
    watched_drafts = drafter.draft(prompts, max_new_tokens=40, seed=3, on_step=seen.append)
    plain = drafter.draft(prompts, max_new_tokens=40, seed=3)
    assert [d.token_ids for d in watched_drafts] == [d.token_ids for d in plain]
    for row, d in enumerate(watched_drafts):
        views = [v for v in seen if v.row == row]
        assert len(views) == sum(d.steps_per_canvas)
        assert all(v.argmax.shape == v.accepted.shape == v.entropy.shape == (drafter.canvas_length,) for v in views)
        assert views[-1].accepted.dtype == torch.bool


def test_json_syntax_errors_carry_a_span():
    v = JsonSchemaValidator().validate(SCHEMA, '{"name": "Ana", "age": 3')
    assert not v.ok and v.spans == ((24, 25),) and v.keywords == ("json",)
