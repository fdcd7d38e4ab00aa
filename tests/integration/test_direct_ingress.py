"""Direct ingress (``deployments/data_plane.py``): the Ingress replica serves HTTP on a port of its
own, bound to 127.0.0.1, and answers what Serve's proxy answers."""

import json
import socket
from urllib.parse import urlsplit

import pytest
import requests
from jsonschema.validators import validator_for

from deployments.data_plane import direct_ingress_urls
from models import tasks

EXAMPLE = next(tasks.examples("eval", 58, 1, kind="json"))


@pytest.fixture(scope="module")
def details(app_url):
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def test_the_ingress_replica_answers_on_its_own_port_as_the_proxy_does(app_url, details):
    urls = direct_ingress_urls(details, "dgserve")
    assert len(urls) == 1  # one Ingress replica, one target
    direct = urls[0]
    assert urlsplit(direct).hostname == "127.0.0.1" and urlsplit(direct).port != urlsplit(app_url).port
    body = {"model": "dgserve-tiny", "max_tokens": 96, "temperature": 0, "seed": 3, "route": "ar",
            "messages": [{"role": "user", "content": EXAMPLE.instruction}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": EXAMPLE.schema}}}
    answers = []
    for base in (direct, app_url):
        r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-route"].startswith("ar")
        content = r.json()["choices"][0]["message"]["content"]
        validator_for(EXAMPLE.schema)(EXAMPLE.schema).validate(json.loads(content))
        answers.append(content)
    assert answers[0] == answers[1]  # greedy: the same answer on either path
    assert requests.get(f"{direct}/v1/models", timeout=30).json()["data"][0]["id"] == "dgserve-tiny"


def test_the_ingress_replicas_port_is_not_open_on_the_nodes_address(details):
    """Bound to ``http_options.host`` (127.0.0.1), not to the node's address the target names."""
    group = next(g for g in details["target_groups"] if g.get("app_name") == "dgserve")
    target = group["targets"][0]
    if target["ip"].startswith("127."):
        pytest.skip("this node's address is a loopback address")
    with pytest.raises(OSError):
        socket.create_connection((target["ip"], target["port"]), timeout=5).close()
