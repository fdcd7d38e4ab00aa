"""The adoption evaluation's parsing and grading (bench/evaluate.py); the whole run against the real
app is tests/integration/test_evaluate.py."""

import json

import pytest

from bench.evaluate import Target, grade, parse_target, summarize

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["city", "n"]}
ITEM = {"id": "a", "messages": [{"role": "user", "content": "x"}], "gold": {"city": "Oslo", "n": 3},
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}}


def test_targets_parse_with_and_without_model_and_route():
    assert parse_target("d=http://127.0.0.1:8000") == Target("d", "http://127.0.0.1:8000")
    assert parse_target("v=http://127.0.0.1:8777/v1@peer") == Target("v", "http://127.0.0.1:8777", "peer")
    assert parse_target("d=http://h:1/@m#ar") == Target("d", "http://h:1", "m", "ar")
    with pytest.raises(Exception):
        parse_target("no-url")


def test_grading_checks_the_schema_and_compares_the_gold_after_parsing():
    assert grade(ITEM, '{"n": 3, "city": "Oslo"}') == (True, True)  # key order and spacing do not matter
    assert grade(ITEM, '{"city":"Oslo","n":4}') == (True, False)
    assert grade(ITEM, '{"city":"Oslo","n":"3"}') == (False, False)
    assert grade(ITEM, '{"city":"Oslo",') == (False, False)
    prose = {"id": "p", "messages": ITEM["messages"], "gold": "Hello there."}
    assert grade(prose, " Hello there.\n") == (None, True)
    assert grade({"id": "q", "messages": ITEM["messages"]}, "anything") == (None, None)


def test_a_summary_counts_every_request_and_names_invalid_successes():
    def res(i, status, content, tokens=4):
        return {"id": f"x{i}", "status": status, "seconds": 0.1 * (i + 1), "first_s": 0.05 * (i + 1),
                "content": content, "tokens": tokens if status == 200 else 0, "route": None, "stats": {}}

    items = [{**ITEM, "id": f"x{i}"} for i in range(4)]
    results = [res(0, 200, json.dumps(ITEM["gold"])), res(1, 200, '{"city":"Oslo","n":9}'),
               res(2, 200, '{"city":1}'), res(3, 422, None)]
    s = summarize(items, results, wall_s=2.0, gpu_hour_usd=3.6, replicas=1)
    assert (s["n"], s["ok"], s["valid"], s["exact"], s["invalid_success"]) == (4, 3, 2, 1, 1)
    assert s["valid_rate"] == 0.5 and s["exact_rate"] == 0.25 and s["errors"] == {"422": 1}
    assert s["tok_per_s"] == 6.0 and s["req_per_s"] == 2.0
    assert s["forwards_per_token"] == 1.0  # a server that says nothing is counted as AR
    assert s["cost_per_mtok_usd"] == pytest.approx(3.6 * 1e6 / (3600 * 6.0))
