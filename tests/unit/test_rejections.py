import pytest

from pipeline.rejections import RejectionCause, cause_of_refusal, classify
from pipeline.telemetry import RequestObservation, metric_events
from pipeline.interfaces import Stats
from pipeline.validation import JsonSchemaValidator

C = RejectionCause


@pytest.mark.parametrize("constrained, finished, keywords, cause", [
    (False, True, ("required",), C.GRAMMAR_UNSUPPORTED),  # decoded free: whatever failed
    (True, False, ("json",), C.BUDGET),  # cut at max_tokens mid-value
    (True, True, ("uniqueItems", "oneOf"), C.VALIDATOR_ONLY),
    (True, True, ("oneOf", "required"), C.ONE_OF),
    (True, True, ("required", "$ref"), C.REF),
    (True, True, ("required",), C.OTHER),
])
def test_the_first_matching_rule_names_the_cause(constrained, finished, keywords, cause):
    assert classify(constrained, finished, keywords) is cause


def test_the_validator_reports_the_failed_keywords_and_refs():
    schema = {"$defs": {"a": {"type": "object", "required": ["x"]}}, "type": "object",
              "properties": {"p": {"$ref": "#/$defs/a"}, "q": {"type": "array", "uniqueItems": True}},
              "oneOf": [{"type": "object"}, {"required": ["p"]}]}
    v = JsonSchemaValidator()
    assert set(v.validate(schema, '{"p":{}}').keywords) == {"oneOf", "required", "$ref"}
    assert v.validate(schema, '{"q":[1,1]}').keywords == ("uniqueItems",)  # not through a $ref
    assert v.validate(schema, '{"p":').keywords == ("json",)
    assert v.validate(schema, '{"p":{"x":1},"q":[1]}').ok is False  # valid under both oneOf branches


def test_a_client_reads_the_cause_back_from_the_error():
    msg = "no answer satisfying the response_format was produced (cause: budget_exhausted): $ ..."
    assert cause_of_refusal(422, msg) is C.BUDGET
    assert cause_of_refusal(400, "response_format is too complex: grammar compilation exceeded 2 s") is C.COMPILE_TIMEOUT
    assert cause_of_refusal(400, "JSON Schema nesting depth 30 exceeds the limit of 24") is C.SCHEMA_REFUSED
    assert cause_of_refusal(422, "no answer") is C.OTHER


def test_a_rejection_is_counted_by_cause():
    obs = RequestObservation("diffusion", 422, False, True, 0.5, stats=Stats(rejection_cause="one_of"))
    assert ("dgserve_structured_rejections", 1, {"cause": "one_of"}) in metric_events(obs)
