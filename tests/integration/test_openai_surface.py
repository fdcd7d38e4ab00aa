import json

import openai
import pytest
import requests
from jsonschema.validators import validator_for

from models import tasks
from tests.apps import measured_route

MODEL = "dgserve-tiny"
SUDOKU_MODEL = "dgserve-sudoku"
JSON_EX = [e for e in tasks.examples("eval", 31, 40, kind="json")][:3]
PROSE_EX = tasks.example("eval", 31, 0, kind="prose")


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("ex", JSON_EX, ids=lambda e: e.instruction[-30:])
def test_json_schema_chat_returns_a_validating_instance(client, ex):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": ex.instruction}],
        response_format=schema_format(ex.schema), max_tokens=128)
    resp = raw.parse()
    instance = json.loads(resp.choices[0].message.content)
    validator_for(ex.schema)(ex.schema).validate(instance)
    assert raw.headers["x-route"].startswith(("diffusion", "ar"))
    body = resp.model_dump()
    assert body["route"]["path"] in ("diffusion", "ar") and body["route"]["reason"]
    assert body["stats"]["validated"] is True
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0


def test_plain_chat_is_routed_by_measurement(client):
    """The app calibrates every path at start-up, so a plain chat is routed by prediction: the
    path it takes is the one predicted soonest, among paths whose agreement with AR holds."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROSE_EX.instruction}], max_tokens=64)
    resp = raw.parse()
    assert resp.choices[0].message.content.strip()
    assert resp.choices[0].finish_reason in ("stop", "length")
    path, predicted = measured_route(raw.headers["x-route"])
    assert predicted and resp.model_dump()["route"]["path"] == path
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_yields_several_chunks_then_ends(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROSE_EX.instruction}], max_tokens=48,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[0].model_dump()["route"]["path"] == "ar"


def test_forced_diffusion_stream_sends_whole_canvases(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROSE_EX.instruction}], max_tokens=48,
        stream=True, extra_body={"route": "diffusion"})
    chunks = list(stream)
    assert chunks[0].model_dump()["route"] == {"path": "diffusion", "reason": "requested by the client"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


@pytest.mark.parametrize("route", ["ar", "diffusion"])
def test_each_forced_route_is_honoured(client, route):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROSE_EX.instruction}], max_tokens=32,
        extra_body={"route": route})
    assert raw.headers["x-route"].startswith(route)
    assert raw.parse().model_dump()["route"] == {"path": route, "reason": "requested by the client"}


def test_models_lists_the_served_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL, SUDOKU_MODEL]


def test_the_sudoku_model_solves_a_held_out_puzzle(client):
    """The second model, chosen by ``model``: a held-out puzzle with ``response_format`` sudoku comes
    back solved, drafted by the Sudoku checkpoint under the board's constraints."""
    from models import sudoku
    from pipeline.validation import SudokuValidator

    p = sudoku.puzzles("eval", 21, 1, "medium")[0]
    raw = client.chat.completions.with_raw_response.create(
        model=SUDOKU_MODEL, messages=[{"role": "user", "content": sudoku.prompt(p.puzzle)}],
        response_format={"type": "sudoku", "sudoku": {"puzzle": p.puzzle}}, max_tokens=100)
    resp = raw.parse()
    assert resp.model == SUDOKU_MODEL and raw.headers["x-route"].startswith("diffusion")
    assert SudokuValidator().validate(p.puzzle, resp.choices[0].message.content).ok


def test_completions_endpoint(client):
    resp = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=16, extra_body={"route": "ar"})
    assert resp.choices[0].text and resp.usage.completion_tokens <= 16


def test_health(app_url):
    r = requests.get(f"{app_url}/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def assert_error(resp, status, fragment):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert fragment in body["error"]["message"]
    assert body["error"]["type"]
    assert "Traceback" not in resp.text


def test_malformed_body_is_400(app_url):
    r = requests.post(f"{app_url}/v1/chat/completions", data=b"{not json", timeout=10,
                      headers={"content-type": "application/json"})
    assert_error(r, 400, "not valid JSON")
    r = requests.post(f"{app_url}/v1/chat/completions", json={"model": MODEL, "messages": "hi"}, timeout=10)
    assert_error(r, 400, "messages")


def test_invalid_schema_is_400_naming_the_problem(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       response_format=schema_format({"type": "object", "properties": {"a": {"type": 5}}}))
    assert "invalid JSON Schema" in e.value.message and "properties" in e.value.message


def test_max_tokens_beyond_limit_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=100_000)
    assert "max_tokens" in e.value.message


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert "gpt-9" in e.value.message


def test_concurrent_drafts_are_denoised_as_one_batch(app_url):
    from concurrent.futures import ThreadPoolExecutor

    body = {"model": MODEL, "max_tokens": 64, "route": "diffusion",
            "messages": [{"role": "user", "content": PROSE_EX.instruction}]}
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: requests.post(f"{app_url}/v1/chat/completions", json=body, timeout=120),
                                range(6)))
    assert all(r.status_code == 200 for r in replies)
    assert max(r.json()["stats"]["batch_size"] for r in replies) > 1


def test_verify_route_returns_ar_greedy_text(client):
    messages = [{"role": "user", "content": PROSE_EX.instruction}]
    ar = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=48, temperature=0,
                                        extra_body={"route": "ar"})
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=48,
                                                           temperature=0, extra_body={"route": "verify"})
    spec = raw.parse()
    assert raw.headers["x-route"].startswith("verify")
    assert spec.choices[0].message.content == ar.choices[0].message.content
    stats = spec.model_dump()["stats"]
    assert stats["drafts"] >= 1 and stats["mean_accepted"] >= 1 and stats["verifier_forwards_per_token"] > 0


def test_regex_and_json_object_formats(client):
    import re

    resp = client.chat.completions.create(
        model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "Give a product code."}],
        response_format={"type": "regex", "regex": {"pattern": "[A-Z][0-9]{3}"}})
    assert re.fullmatch("[A-Z][0-9]{3}", resp.choices[0].message.content)
    resp = client.chat.completions.create(model=MODEL, max_tokens=64, response_format={"type": "json_object"},
                                          messages=[{"role": "user", "content": JSON_EX[0].instruction}])
    assert isinstance(json.loads(resp.choices[0].message.content), dict)
