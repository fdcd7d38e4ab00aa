"""Why a structured request was not served: the closed set of causes, and the rule that names one.

A 422 (no answer satisfying the constraint) names its cause in its message (``... was produced
(cause: budget_exhausted) ...``), in the response's ``stats.rejection_cause`` on the span, and in
``dgserve_structured_rejections_total{cause}``; ``bench.jsonschemabench`` counts them per set. The
400s a constraint gets before any decoding (refused by a limit, a grammar compile past its time
cap) are causes too, named here so that the benchmark counts every refusal in one table.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Sequence


class RejectionCause(str, Enum):
    GRAMMAR_UNSUPPORTED = "grammar_unsupported"  # no grammar engine compiles it: decoding ran free
    BUDGET = "budget_exhausted"  # the constrained answer ran past max_tokens
    VALIDATOR_ONLY = "validator_only_keyword"  # a keyword the grammar does not express failed
    ONE_OF = "one_of"  # an exclusive oneOf: grammars decode it as anyOf, and the answer matched several or none
    REF = "ref"  # a keyword reached through a $ref failed
    COMPILE_TIMEOUT = "compile_timeout"  # 400: grammar compilation ran past its cap
    SCHEMA_REFUSED = "schema_refused"  # 400: the schema broke a limit (size, depth, $ref cycle, pattern)
    OTHER = "other"


# Keywords a JSON Schema grammar (xgrammar, llguidance) does not enforce while decoding: only the
# validator checks them, so an answer decoded under the grammar can still fail them.
VALIDATOR_ONLY_KEYWORDS = frozenset({
    "uniqueItems", "dependentRequired", "dependentSchemas", "dependencies", "format", "not", "if", "then",
    "else", "contains", "minContains", "maxContains", "propertyNames", "multipleOf", "unevaluatedProperties",
    "unevaluatedItems", "patternProperties", "minProperties", "maxProperties",
})


def classify(constrained: bool, finished: bool, keywords: Sequence[str]) -> RejectionCause:
    """The cause of a final answer that failed validation. ``constrained``: it was decoded under a
    grammar; ``finished``: it ended by itself (not at ``max_tokens``); ``keywords``: the keyword each
    validation error failed (``"$ref"`` where it was reached through one, ``"json"``: not JSON).

    First match wins: decoded free -> grammar_unsupported; cut at the budget -> budget_exhausted; a
    validator-only keyword -> validator_only_keyword; ``oneOf`` -> one_of; ``$ref`` -> ref; else other.
    Example: constrained, finished, ``("uniqueItems",)`` -> ``validator_only_keyword``."""
    if not constrained:
        return RejectionCause.GRAMMAR_UNSUPPORTED
    if not finished:
        return RejectionCause.BUDGET
    if any(k in VALIDATOR_ONLY_KEYWORDS for k in keywords):
        return RejectionCause.VALIDATOR_ONLY
    if "oneOf" in keywords:
        return RejectionCause.ONE_OF
    if "$ref" in keywords:
        return RejectionCause.REF
    return RejectionCause.OTHER


def cause_of_refusal(status: int, message: str) -> RejectionCause:
    """The cause of an error answer, as a client reads it: a 422 names its own; a 400 about the
    response_format is a compile timeout or a refused schema."""
    if status == 422:
        for cause in RejectionCause:
            if f"(cause: {cause.value})" in message:
                return cause
        return RejectionCause.OTHER
    if status == 400 and "grammar compilation exceeded" in message:
        return RejectionCause.COMPILE_TIMEOUT
    if status == 400:
        return RejectionCause.SCHEMA_REFUSED
    return RejectionCause.OTHER


# A retry decodes the request again under a narrower constraint, or sampled: (label, JSON Schema,
# temperature, seed). The answer is validated against the original constraint.
Retry = tuple[str, Any, float, int]


def retry_plan(cause: RejectionCause, schema: Any, limit: int) -> list[Retry]:
    """What to try, in order, for a JSON Schema whose answers failed for ``cause`` (at most
    ``limit``): cut at the budget -> the minimal schema (short answers); an exclusive ``oneOf`` ->
    each branch in turn; a keyword the grammar cannot express, a ``$ref`` or another cause -> the
    minimal schema, then sampled answers (the grammar still holds; a draw may satisfy what it
    cannot say, e.g. ``uniqueItems``). A free decode (no grammar) is not retried.

    Example: ``one_of`` on ``{"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]}``
    with ``limit`` 3 -> ``[("oneOf branch 1", {"type": "object", "required": ["a"]}, 0.0, 0), ("oneOf
    branch 2", {"type": "object", "required": ["b"]}, 0.0, 0), ("minimal schema", ..., 0.0, 0)]``."""
    from models.schema_variants import minimal_schema, one_of_branches

    if cause in (RejectionCause.GRAMMAR_UNSUPPORTED, RejectionCause.COMPILE_TIMEOUT, RejectionCause.SCHEMA_REFUSED):
        return []
    plan: list[Retry] = []
    if cause is RejectionCause.ONE_OF:
        plan += [(f"oneOf branch {i + 1}", s, 0.0, 0) for i, s in enumerate(one_of_branches(schema, limit))]
    plan.append(("minimal schema", minimal_schema(schema), 0.0, 0))
    if cause is not RejectionCause.BUDGET:
        plan += [(f"sampled {k}", schema, 0.8, k) for k in range(1, limit + 1)]
    return plan[:limit]
