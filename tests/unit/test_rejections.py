import pytest

from pipeline.rejections import RejectionCause, cause_of_refusal, classify, retry_plan
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


def test_the_retry_plan_per_cause():
    one_of = {"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}, {"required": ["c"]}]}
    plan = retry_plan(C.ONE_OF, one_of, 3)
    assert [p[0] for p in plan] == ["oneOf branch 1", "oneOf branch 2", "oneOf branch 3"]
    assert plan[1][1] == {"type": "object", "required": ["b"]} and plan[1][2] == 0.0
    budget = retry_plan(C.BUDGET, one_of, 3)
    assert [p[0] for p in budget] == ["minimal schema"]  # a sampled answer is no shorter
    unique = {"type": "array", "uniqueItems": True}
    assert [(p[0], p[2], p[3]) for p in retry_plan(C.VALIDATOR_ONLY, unique, 3)] == [
        ("minimal schema", 0.0, 0), ("sampled 1", 0.8, 1), ("sampled 2", 0.8, 2)]
    assert retry_plan(C.GRAMMAR_UNSUPPORTED, unique, 3) == [] and retry_plan(C.OTHER, unique, 0) == []


def test_variants_admit_only_instances_of_the_original():
    from hypothesis import given, settings, strategies as st
    from jsonschema.validators import validator_for

    from models.schema_variants import minimal_schema, one_of_branches

    schema = {"type": "object", "required": ["name", "tags"], "properties": {
        "name": {"type": "string", "minLength": 2}, "age": {"type": "integer"},
        "tags": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}
    small = minimal_schema(schema)
    assert small["properties"].keys() == {"name", "tags"} and small["additionalProperties"] is False
    assert small["properties"]["name"]["maxLength"] == 8 and small["properties"]["tags"]["maxItems"] == 1
    assert one_of_branches(schema) == []
    original, narrowed = validator_for(schema)(schema), validator_for(small)(small)

    @settings(max_examples=200, deadline=None)
    @given(st.fixed_dictionaries({"name": st.text(max_size=10), "tags": st.lists(st.text(max_size=3), max_size=3)},
                                 optional={"age": st.integers()}))
    def check(instance):
        if narrowed.is_valid(instance):
            assert original.is_valid(instance)

    check()


def test_a_combinator_beside_the_nodes_own_keywords_is_distributed_for_decoding():
    from models.grammar import tighten_schema
    from models.schema_variants import one_of_branches

    # Glaiveai2K's shape: the object's keywords beside a oneOf of bare "required" branches; decoded
    # as it stands, a branch that names no type lets any value through ({"dimensions": 2.2})
    node = {"type": "object", "properties": {"r": {"type": "number"}, "w": {"type": "number"}},
            "oneOf": [{"required": ["r"]}, {"required": ["w"]}]}
    tight = tighten_schema(node)
    assert [b["required"] for b in tight["anyOf"]] == [["r"], ["w"]]
    assert all(b["type"] == "object" and set(b["properties"]) == {"r", "w"} for b in tight["anyOf"])
    first, second = one_of_branches(node)
    assert first == {"type": "object", "properties": {"r": {"type": "number"}}, "required": ["r"]}
    assert second["properties"].keys() == {"w"} and second["required"] == ["w"]
    assert tighten_schema({"anyOf": [{"type": "string"}]}) == {"anyOf": [{"type": "string", "maxLength": 32}]}
