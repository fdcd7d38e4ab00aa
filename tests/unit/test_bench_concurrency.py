"""The concurrency benchmark's interleaving (``bench/concurrency.py``) against two real HTTP servers
on 127.0.0.1 that answer as OpenAI chat servers do: each level runs on every server, the servers'
order reversed every other round, and the comparison reads the rows of the same level and round."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.concurrency import Target, compare, run_levels

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat_server(name: str, answer: str, log: list):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            log.append((name, body.get("route"), body["response_format"]["json_schema"]["schema"] == SCHEMA))
            reply = json.dumps({"choices": [{"message": {"content": answer}}], "usage": {"completion_tokens": 3}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def servers():
    log: list = []
    ours, peer = chat_server("ours", '{"a": 1}', log), chat_server("peer", '{"a": "one"}', log)
    yield log, [Target("dgserve ar", f"http://127.0.0.1:{ours.server_port}/v1/chat/completions", "m", "ar"),
                Target("vLLM (AR + xgrammar)", f"http://127.0.0.1:{peer.server_port}/v1/chat/completions", "peer")]
    for s in (ours, peer):
        s.shutdown()
        s.server_close()


def test_levels_interleave_the_servers_and_compare_within_a_round(servers):
    log, targets = servers
    items = [("extract", SCHEMA)] * 4
    rows = run_levels(targets, items, [1, 2], max_tokens=8, rounds=3, settle_timeout_s=1.0)

    order = [(r["concurrency"], r["round"], r["server"]) for r in rows]
    a, b = "dgserve ar", "vLLM (AR + xgrammar)"
    assert order == [(c, r, s) for c in (1, 2) for r, pair in ((1, (a, b)), (2, (b, a)), (3, (a, b))) for s in pair]
    # every request reached the server its row names, with the route and the schema it was sent with
    assert sorted(set(log)) == [("ours", "ar", True), ("peer", None, True)]
    assert sum(1 for e in log if e[0] == "ours") == sum(1 for e in log if e[0] == "peer") == 2 + 2 * 3 * 4
    # the answers are checked against their schema: the peer's breaks it and counts as an invalid success
    assert all(r["valid"] == 4 and r["invalid_success"] == 0 for r in rows if r["server"] == a)
    assert all(r["valid"] == 0 and r["invalid_success"] == 4 for r in rows if r["server"] == b)

    ratios = compare(rows)
    assert [(v["concurrency"], v["round"]) for v in ratios] == [(c, r) for c in (1, 2) for r in (1, 2, 3)]
    for v in ratios:
        ours = next(r for r in rows if (r["concurrency"], r["round"], r["server"]) == (v["concurrency"], v["round"], a))
        peer = next(r for r in rows if (r["concurrency"], r["round"], r["server"]) == (v["concurrency"], v["round"], b))
        assert v["best"] == a and v["req_s_ratio"] == round(ours["req_s"] / peer["req_s"], 2)
        assert (v["p50_ms"], v["vllm_p50_ms"]) == (ours["p50_ms"], peer["p50_ms"])


def test_compare_takes_the_best_dgserve_route_of_each_level():
    def row(server, c, req_s, p50):
        return {"server": server, "concurrency": c, "req_s": req_s, "p50_ms": p50}

    rows = [row("dgserve auto", 4, 10.0, 300), row("dgserve ar", 4, 12.0, 250), row("vLLM (AR + xgrammar)", 4, 8.0, 400),
            row("dgserve auto", 8, 9.0, 500), row("dgserve ar", 8, 6.0, 700), row("vLLM (AR + xgrammar)", 8, 12.0, 450),
            row("dgserve ar", 16, 20.0, 600)]  # no peer at 16: no ratio
    assert compare(rows) == [
        {"concurrency": 4, "best": "dgserve ar", "req_s_ratio": 1.5, "p50_ms": 250, "vllm_p50_ms": 400},
        {"concurrency": 8, "best": "dgserve auto", "req_s_ratio": 0.75, "p50_ms": 500, "vllm_p50_ms": 450}]
