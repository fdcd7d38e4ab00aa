"""The HTTP surface's rules without Ray: parsing, limits, errors, SSE framing."""

import asyncio
import json

import pytest

from pipeline.assemble import local_pipeline
from pipeline.gateway import Gateway, Limits


@pytest.fixture(scope="module")
def gateway(drafter, verifier):
    pipe = local_pipeline(drafter, verifier)
    return Gateway(pipe, "dgserve-tiny", Limits(max_tokens=64, default_max_tokens=32, max_prompt_chars=500))


def call(gateway, body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(gateway.chat(raw))


def msg(text="Describe Oslo in a few words."):
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("body, status, fragment", [
    (b"", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"model": "dgserve-tiny"}, 400, "messages"),
    ({"model": "dgserve-tiny", "messages": msg(), "temperature": 5}, 400, "temperature"),
    ({"model": "dgserve-tiny", "messages": msg(), "n": 2}, 400, "n"),
    ({"model": "dgserve-tiny", "messages": msg(), "max_tokens": 65}, 400, "limit of 64"),
    ({"model": "dgserve-tiny", "messages": msg("x" * 600)}, 400, "exceeds the limit of 500"),
    ({"model": "dgserve-tiny", "messages": msg(), "route": "fast"}, 400, "route"),
    ({"model": "other", "messages": msg()}, 404, "other"),
    ({"model": "dgserve-tiny", "messages": msg(), "response_format": {"type": "json_schema"}}, 400, "json_schema"),
    ({"model": "dgserve-tiny", "messages": msg(), "response_format": {"type": "xml"}}, 400, "unsupported"),
    ({"model": "dgserve-tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "only text"),
])
def test_errors_are_openai_error_objects(gateway, body, status, fragment):
    reply = call(gateway, body)
    assert reply.status == status
    assert fragment in reply.body["error"]["message"]
    assert reply.body["error"]["type"]


def test_default_max_tokens_and_usage(gateway):
    reply = call(gateway, {"model": "dgserve-tiny", "messages": msg(), "route": "ar"})
    assert reply.status == 200
    assert reply.body["usage"]["completion_tokens"] <= 32
    assert reply.headers["x-route"] == "ar; reason=requested by the client"


def test_sse_framing(gateway):
    reply = call(gateway, {"model": "dgserve-tiny", "messages": msg(), "stream": True, "max_tokens": 20,
                           "stream_options": {"include_usage": True}})
    assert reply.status == 200 and reply.headers["x-route"].startswith("ar")

    async def drain():
        return [frame async for frame in reply.stream]

    frames = asyncio.run(drain())
    assert frames[-1] == b"data: [DONE]\n\n"
    objs = [json.loads(f[6:]) for f in frames[:-1]]
    assert objs[0]["choices"][0]["delta"]["role"] == "assistant"
    assert objs[-1]["usage"]["completion_tokens"] > 0
    assert [o["choices"][0]["finish_reason"] for o in objs if o["choices"] and o["choices"][0]["finish_reason"]]


def test_completions_prompt(gateway):
    reply = asyncio.run(gateway.completions(json.dumps(
        {"model": "dgserve-tiny", "prompt": "Oslo is", "max_tokens": 8, "route": "ar"}).encode()))
    assert reply.status == 200 and reply.body["object"] == "text_completion"


def test_api_key_is_required_everywhere_but_health(gateway):
    from pipeline.gateway import Gateway

    locked = Gateway(gateway.pipeline, "dgserve-tiny", gateway.limits, gateway.registry, api_key="s3cret")
    body = json.dumps({"model": "dgserve-tiny", "messages": msg(), "route": "ar", "max_tokens": 4}).encode()
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        assert asyncio.run(locked.chat(body, headers)).status == 401
        assert asyncio.run(locked.completions(b"{}", headers)).status == 401
        reply = locked.models(headers)
        assert reply.status == 401 and reply.body["error"]["code"] == "invalid_api_key"
    good = {"authorization": "Bearer s3cret"}
    assert asyncio.run(locked.chat(body, good)).status == 200
    assert locked.models(good).status == 200
    assert locked.health().status == 200


def test_body_cap_and_deadline(gateway):
    from pipeline.gateway import Gateway, Limits

    small = Gateway(gateway.pipeline, "dgserve-tiny", Limits(max_body_bytes=100, request_timeout_s=30))
    big = json.dumps({"model": "dgserve-tiny", "messages": msg("x" * 200)}).encode()
    assert asyncio.run(small.chat(big)).status == 413
    body = json.dumps({"model": "dgserve-tiny", "messages": msg(), "max_tokens": 64, "route": "ar"}).encode()
    reply = asyncio.run(gateway.chat(body, {"x-request-timeout-seconds": "0.001"}))
    assert reply.status == 504 and reply.body["error"]["code"] == "deadline_exceeded"
    assert asyncio.run(gateway.chat(body, {"x-request-timeout-seconds": "soon"})).status == 400
    assert asyncio.run(gateway.chat(body, {"x-request-timeout-seconds": "30"})).status == 200
