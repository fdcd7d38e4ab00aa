"""Fuzz campaign: hostile and random JSON Schemas through the whole structured path, in-process.

Every case is one ``/v1/chat/completions`` request with ``response_format: json_schema`` handed to
the real :class:`pipeline.gateway.Gateway` over the real pipeline (the committed tiny checkpoint:
validator, grammar, canvas-guided draft, repair, fallback). Each case must end in a 200 whose
answer validates, or a clear 4xx, within ``--case-limit-s``; the process' RSS must stay within
``--rss-limit-mb`` of where it started.

Schemas come from :func:`schemas` (hypothesis): deep, wide, recursive with and without a finite
instance, huge enums, pathological patterns and formats, ``oneOf`` explosions, numbers and sizes
with absurd bounds, and random keyword soup.

Run: ``python -m bench.schema_fuzz --cases 300 --seed 0 --json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from hypothesis import strategies as st

PATTERNS = ["^(a+)+$", "(a|aa)*b", "^(\\d+)*$", ".{0,1000}", "^[a-z]{3}-\\d{2,4}$", "(x+x+)+y", "\\p{L}+",
            "^(?=a)b", "[", "a{1000}", "a{1001}", "(?i)abc", ""]
FORMATS = ["email", "date-time", "date", "time", "uri", "ipv4", "ipv6", "uuid", "hostname", "regex", "bogus"]
ABSURD = [0, -1, 1, 10**6, 10**9, 2**63, 1e308, -1e308, 1e-300, 0.5]


def _leaf():
    string = st.fixed_dictionaries({"type": st.just("string")}, optional={
        "pattern": st.sampled_from(PATTERNS), "format": st.sampled_from(FORMATS),
        "minLength": st.sampled_from(ABSURD[:6]), "maxLength": st.sampled_from(ABSURD[:6])})
    number = st.fixed_dictionaries({"type": st.sampled_from(["integer", "number"])}, optional={
        "minimum": st.sampled_from(ABSURD), "maximum": st.sampled_from(ABSURD),
        "exclusiveMinimum": st.sampled_from(ABSURD), "multipleOf": st.sampled_from([1e-300, 0.5, 7, 1e308])})
    enum = st.integers(1, 3000).map(lambda n: {"enum": [f"value-{i}" for i in range(n)]})
    return st.one_of(string, number, enum, st.just({"type": "boolean"}), st.just({"type": "null"}),
                     st.just({}), st.just({"const": "x" * 2000}), st.just(True), st.just(False))


def _compound(children):
    obj = st.builds(lambda props, req, extra: {
        "type": "object", "properties": props, "required": [k for k in props if req],
        **({"additionalProperties": False} if extra else {})},
        st.dictionaries(st.sampled_from([f"k{i}" for i in range(12)]), children, max_size=6), st.booleans(),
        st.booleans())
    arr = st.builds(lambda items, lo: {"type": "array", "items": items, **({"minItems": lo} if lo else {})},
                    children, st.sampled_from([0, 1, 3, 10**6]))
    comb = st.builds(lambda k, xs: {k: xs}, st.sampled_from(["oneOf", "anyOf", "allOf"]),
                     st.lists(children, min_size=1, max_size=5))
    return st.one_of(obj, arr, comb)


def _deep(depth: int, required: bool) -> dict:
    node: dict = {}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}, **({"required": ["a"]} if required else {})}
    return node


def _wide(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)},
            "required": [f"p{i}" for i in range(n)]}


def _recursive(finite: bool) -> dict:
    nxt = {"$ref": "#/$defs/n"} if not finite else {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}
    return {"$defs": {"n": {"type": "object", "properties": {"next": nxt, "v": {"type": "integer"}},
                            "required": ["next"]}}, "$ref": "#/$defs/n"}


def _one_of_explosion(width: int, depth: int) -> dict:
    """``width ** depth`` paths to one leaf; kept under ~50k leaves when written out (a body of
    ~1 MB: beyond that the size limit answers before anything else)."""
    node: dict = {"type": "integer"}
    while depth > 1 and width ** depth > 50_000:
        depth -= 1
    for _ in range(depth):
        node = {"oneOf": [node] * width}
    return node


HOSTILE = st.one_of(
    st.builds(_deep, st.integers(1, 40), st.booleans()),
    st.builds(_wide, st.integers(1, 400)),
    st.builds(_recursive, st.booleans()),
    st.builds(_one_of_explosion, st.integers(2, 12), st.integers(1, 8)),
    st.just({"$ref": "#"}), st.just({"allOf": [{"$ref": "#"}]}),
    st.just({"type": "array", "minItems": 10**9, "items": {"type": "integer"}}),
    st.just({"type": "string", "minLength": 10**6}),
    st.just({"type": "object", "required": ["x"], "additionalProperties": False}),
    st.just({"type": "object", "properties": {"a": False}, "required": ["a"]}),
)


def schemas():
    """Hostile schemas and random keyword soup (leaves under objects, arrays and combinators)."""
    return st.one_of(HOSTILE, st.recursive(_leaf(), _compound, max_leaves=12))


@dataclass
class CaseResult:
    status: int
    seconds: float
    valid: bool | None  # for a 200: the answer validates against the schema
    schema_bytes: int
    message: str = ""


@dataclass
class Campaign:
    cases: int = 0
    ar_budget_s: float = 0.0  # this machine's time for AR to decode one answer's token budget
    timeout_s: float = 0.0  # the per-request deadline the cases ran under
    case_limit_s: float = 0.0
    by_status: dict[str, int] = field(default_factory=dict)
    invalid_success: int = 0
    over_limit: int = 0  # cases that took longer than the per-case limit
    slowest_s: float = 0.0
    slowest_message: str = ""
    rss_start_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_growth_mb: float = 0.0
    failures: list[str] = field(default_factory=list)  # cases that broke a rule, with their schema


def in_process_gateway(max_tokens: int = 64):
    """The app's structured path without Ray: the committed checkpoint's drafter (canvas-guided)
    and same-weights AR (grammar-constrained), the default validators."""
    from models.drafter import DiffusionDrafter
    from models.loading import load_diffusion_model
    from models.verifier import ARVerifier
    from pipeline.assemble import local_pipeline
    from pipeline.gateway import Gateway, Limits

    model, tokenizer = load_diffusion_model(None, device="cpu", dtype="float32")
    drafter = DiffusionDrafter(model, tokenizer)
    verifier = ARVerifier.from_diffusion_model(model, tokenizer)
    pipe = local_pipeline(drafter, verifier)
    return Gateway(pipe, "dgserve-tiny", Limits(max_tokens=max_tokens, default_max_tokens=max_tokens))


def run_case(gateway, schema, timeout_s: float) -> CaseResult:
    import jsonschema

    raw = json.dumps({"model": "dgserve-tiny", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "Answer with JSON matching the schema."}],
                      "response_format": {"type": "json_schema", "json_schema": {"name": "fuzz", "schema": schema}}})
    start = time.perf_counter()
    reply = asyncio.run(gateway.chat(raw.encode(), {"x-request-timeout-seconds": str(timeout_s)}))
    seconds = time.perf_counter() - start
    valid = None
    message = (reply.body or {}).get("error", {}).get("message", "") if reply.status != 200 else ""
    if reply.status == 200:
        text = reply.body["choices"][0]["message"]["content"]
        try:
            jsonschema.validate(json.loads(text), schema)
            valid = True
        except Exception:
            valid = False
    return CaseResult(reply.status, seconds, valid, len(raw), message[:160])


# The worst legitimate structured case is a draft, a repair and a fallback: about three AR runs of
# the whole budget. The deadline allows twice that, in this machine's own time, and never less than
# the given seconds (a machine where that budget decodes in 0.13 s keeps 1.5 s / 2.0 s).
BUDGET_RUNS_PER_DEADLINE = 6


def ar_budget_seconds(gateway, max_tokens: int = 64, runs: int = 3) -> float:
    """Median time for the gateway's AR to decode ``max_tokens`` tokens on this machine (measured
    per token over a few greedy runs, so an early ``<eos>`` does not shorten it)."""
    import statistics

    verifier = gateway.pipeline.ar.verifier
    prompt = verifier.tokenizer("Answer with JSON matching the schema.")["input_ids"]
    verifier.generate([prompt], max_new_tokens=4)  # warm-up
    per_token = []
    for _ in range(runs):
        start = time.perf_counter()
        g = verifier.generate([prompt], max_new_tokens=max_tokens)[0]
        per_token.append((time.perf_counter() - start) / max(1, len(g.token_ids)))
    return statistics.median(per_token) * max_tokens


def campaign(gateway, cases: int, seed: int, case_limit_s: float = 2.0, timeout_s: float = 1.5) -> Campaign:
    """Run ``cases`` schemas drawn by hypothesis (seeded; generation only, no shrinking). The
    per-request deadline is ``timeout_s`` and the per-case limit ``case_limit_s``, each raised to
    this machine's pace (:data:`BUDGET_RUNS_PER_DEADLINE` AR budgets) where that is slower."""
    import psutil
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    proc = psutil.Process()
    unit = ar_budget_seconds(gateway)
    scale = max(1.0, BUDGET_RUNS_PER_DEADLINE * unit / timeout_s)
    timeout_s, case_limit_s = round(timeout_s * scale, 2), round(case_limit_s * scale, 2)
    out = Campaign(ar_budget_s=round(unit, 3), timeout_s=timeout_s, case_limit_s=case_limit_s,
                   rss_start_mb=round(proc.memory_info().rss / 2**20, 1))
    statuses: Counter = Counter()
    peak = [out.rss_start_mb]

    @hypothesis_seed(seed)
    @settings(max_examples=cases, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(schemas())
    def one(schema):
        r = run_case(gateway, schema, timeout_s)
        out.cases += 1
        statuses[str(r.status)] += 1
        peak[0] = max(peak[0], proc.memory_info().rss / 2**20)
        if r.seconds > out.slowest_s:
            out.slowest_s, out.slowest_message = round(r.seconds, 3), f"{r.status} {r.message}"[:160]
        broke = []
        if r.status == 200 and not r.valid:
            out.invalid_success += 1
            broke.append("invalid success")
        if r.status >= 500:
            broke.append(f"status {r.status}: {r.message}")
        if r.seconds > case_limit_s:
            out.over_limit += 1
            broke.append(f"{r.seconds:.2f} s")
        if broke:
            out.failures.append(f"{'; '.join(broke)} <- {json.dumps(schema)[:300]}")

    one()
    out.by_status = dict(sorted(statuses.items()))
    out.rss_peak_mb = round(peak[0], 1)
    out.rss_growth_mb = round(peak[0] - out.rss_start_mb, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case-limit-s", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    gateway = in_process_gateway()
    c = campaign(gateway, a.cases, a.seed, a.case_limit_s)
    if a.json:
        print(json.dumps(asdict(c)))
    else:
        for k, v in asdict(c).items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
