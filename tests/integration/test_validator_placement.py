"""``validator.placement: ingress``: no Validator deployment; the Ingress replica checks the answers."""

import json

import pytest
import requests
from jsonschema.validators import validator_for

from models import tasks
from tests.apps import served

EXAMPLES = list(tasks.examples("eval", 57, 2, kind="json"))


@pytest.fixture(scope="module")
def inline(app_url):
    small = {"num_cpus": 0.2, "max_ongoing_requests": 8}
    args = {"validator": {"placement": "ingress"}, "router": {"policy": "static"},
            "drafter": {"device": "cpu", "dtype": "float32", "replica": small},
            "limits": {"max_in_flight": 8}, "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 16}}
    with served(args, "inline", "/inline", f"{app_url}/inline", 90) as url:
        yield url


@pytest.mark.parametrize("route", ["diffusion", "ar"])
def test_answers_are_checked_in_the_ingress(inline, route):
    from ray import serve

    assert set(serve.status().applications["inline"].deployments) == {"Ingress", "Drafter"}
    for ex in EXAMPLES:
        r = requests.post(f"{inline}/v1/chat/completions", timeout=120, json={
            "model": "dgserve-tiny", "max_tokens": 128, "route": route,
            "messages": [{"role": "user", "content": ex.instruction}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ex.schema}}})
        assert r.status_code == 200, r.text
        body = r.json()
        validator_for(ex.schema)(ex.schema).validate(json.loads(body["choices"][0]["message"]["content"]))
        assert body["route"]["path"] == route and body["stats"]["validated"] is True
