import json

import pytest

from pipeline.interfaces import Constraint
from pipeline.json_spans import char_to_token_span, value_spans
from pipeline.validation import ConstraintError, default_registry

REG = default_registry()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"]}


def test_value_spans_worked_example():
    text = '{"a":[1,{"b":true}]}'
    spans = value_spans(text)
    assert spans[()] == (0, 20)
    assert text[slice(*spans[("a",)])] == '[1,{"b":true}]'
    assert text[slice(*spans[("a", 1, "b")])] == "true"
    assert value_spans('{"a": [1, 2') == {("a", 0): (7, 8), ("a", 1): (10, 11)}  # cut short


def test_schema_errors_carry_path_and_span():
    text = '{"name": "Ann", "age": -3, "tags": ["x", 7]}'
    v = REG.validate(Constraint("json_schema", SCHEMA), text)
    assert not v.ok
    assert set(v.paths) == {"$.age", "$.tags[1]"}
    spans = dict(zip(v.paths, v.spans))
    assert text[slice(*spans["$.age"])] == "-3"
    assert text[slice(*spans["$.tags[1]"])] == "7"
    assert any("$.age (chars" in e for e in v.errors)


def test_error_span_maps_to_tokens(dg):
    _, tok = dg
    text = '{"name":"Ann","age":-3}'
    v = REG.validate(Constraint("json_schema", SCHEMA), text)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    first, last = char_to_token_span(enc["offset_mapping"], v.spans[0])
    assert "-3" in tok.decode(enc["input_ids"][first:last])
    assert first > 0


def test_draft_is_picked_from_dollar_schema():
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "integer", "maximum": 5,
              "exclusiveMaximum": True}
    assert not REG.validate(Constraint("json_schema", draft4), "5").ok
    assert REG.validate(Constraint("json_schema", draft4), "4").ok


@pytest.mark.parametrize("schema, fragment", [
    ({"type": "nope"}, "invalid JSON Schema"),
    ({"type": "object", "properties": {"a": {"minimum": "x"}}}, "$.properties.a.minimum"),
    ("string", "must be a JSON object"),
])
def test_broken_schemas_are_refused_with_the_reason(schema, fragment):
    with pytest.raises(ConstraintError) as e:
        REG.prepare(Constraint("json_schema", schema))
    assert fragment in str(e.value)


def test_accepted_schemas_are_remembered_refusals_are_not(monkeypatch):
    from jsonschema.validators import Draft202012Validator

    from pipeline.validation import JsonSchemaValidator

    checks = []
    real = Draft202012Validator.check_schema.__func__
    monkeypatch.setattr(Draft202012Validator, "check_schema",
                        classmethod(lambda cls, s, **kw: (checks.append(1), real(cls, s, **kw))[1]))
    v = JsonSchemaValidator(remember=2)
    v.prepare(SCHEMA)
    v.prepare(json.loads(json.dumps(SCHEMA, sort_keys=True)))  # the same schema, keys in another order
    assert len(checks) == 1
    for _ in range(2):  # a refused schema is checked, and refused, every time
        with pytest.raises(ConstraintError, match="invalid JSON Schema"):
            v.prepare({"type": "nope"})
    assert len(checks) == 3
    v.prepare({"type": "integer"})
    v.prepare({"type": "string"})  # the third accepted schema: the first is forgotten
    v.prepare(SCHEMA)
    assert len(checks) == 6


def test_schema_size_and_depth_limits():
    deep = {"type": "object"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    with pytest.raises(ConstraintError, match="depth"):
        REG.prepare(Constraint("json_schema", deep))
    huge = {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 100} for i in range(1000)}}
    with pytest.raises(ConstraintError, match="bytes"):
        REG.prepare(Constraint("json_schema", huge))


def test_json_object():
    assert REG.validate(Constraint("json_object"), '{"a": 1}').ok
    assert not REG.validate(Constraint("json_object"), "[1]").ok
    assert not REG.validate(Constraint("json_object"), "{").ok


def test_regex_full_match_and_limits():
    c = Constraint("regex", r"[A-Z]\d{3}")
    REG.prepare(c)
    assert REG.validate(c, "K123").ok
    assert not REG.validate(c, "K1234").ok and not REG.validate(c, "xK123").ok
    with pytest.raises(ConstraintError):
        REG.prepare(Constraint("regex", "(unclosed"))
    evil = Constraint("regex", r"(a+)+$")
    v = default_registry().get("regex")
    v.timeout_s = 0.2
    assert not v.validate(evil.spec, "a" * 40 + "!").ok


PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"
SOLUTION = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"


def test_sudoku_validator():
    c = Constraint("sudoku", PUZZLE)
    REG.prepare(c)
    assert REG.validate(c, SOLUTION).ok
    broken = SOLUTION[:1] + "2" + SOLUTION[2:]  # repeats a digit in row 1 and box 1
    v = REG.validate(c, broken)
    assert not v.ok and any("row 1" in e for e in v.errors)
    changed_clue = "6" + SOLUTION[1:]
    assert any("keep clue 5" in e for e in REG.validate(c, changed_clue).errors)
    with pytest.raises(ConstraintError):
        REG.prepare(Constraint("sudoku", "55" + PUZZLE[2:]))
    with pytest.raises(ConstraintError):
        REG.prepare(Constraint("sudoku", "123"))


def test_unknown_kind_is_refused():
    with pytest.raises(ConstraintError, match="unsupported"):
        REG.prepare(Constraint("yaml"))


def test_custom_validator_registers_by_name():
    from pipeline.validation import load_validator_factory

    reg = default_registry({"sudoku2": load_validator_factory("pipeline.validation:SudokuValidator")})
    assert reg.validate(Constraint("sudoku2", PUZZLE), SOLUTION).ok
    assert json.loads(json.dumps(reg.kinds()))


def test_catastrophic_schema_pattern_is_time_capped():
    import time

    schema = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}
    t0 = time.perf_counter()
    v = REG.validate(Constraint("json_schema", schema), json.dumps({"s": "a" * 40 + "!"}))
    assert not v.ok  # `re` would backtrack for minutes here; the capped matcher answers at once
    assert time.perf_counter() - t0 < 5
    assert REG.validate(Constraint("json_schema", schema), '{"s": "aaa"}').ok


@pytest.mark.parametrize("schema, fragment", [
    ({"$ref": "#"}, "never descends"),
    ({"type": "object", "allOf": [{"$ref": "#"}]}, "never descends"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}, "never descends"),
    ({"$ref": "http://127.0.0.1:9/evil.json"}, "only references inside"),
    ({"$anchor": "a", "allOf": [{"$ref": "#a"}]}, "never descends"),
    ({"$ref": "#/$defs/missing"}, "does not resolve"),
    ({"$defs": {"a0": {"type": "string"}, **{f"a{i}": {"allOf": [{"$ref": f"#/$defs/a{i-1}"}] * 2} for i in range(1, 16)}},
      "$ref": "#/$defs/a15"}, "fan-out"),
])
def test_hostile_refs_are_refused_at_prepare(schema, fragment):
    with pytest.raises(ConstraintError, match=fragment):
        REG.prepare(Constraint("json_schema", schema))


def test_recursion_through_the_value_is_allowed():
    tree = {"$defs": {"n": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                            "required": ["kids"]}}, "$ref": "#/$defs/n"}
    REG.prepare(Constraint("json_schema", tree))
    assert REG.validate(Constraint("json_schema", tree), '{"kids": [{"kids": []}]}').ok
    assert not REG.validate(Constraint("json_schema", tree), '{"kids": [{}]}').ok


@pytest.mark.parametrize("constraint", [
    Constraint("regex", "a{100000}"), Constraint("regex", "[0-9]{2,5000}"),
    Constraint("json_schema", {"type": "string", "pattern": "^x{1000000}$"}),
])
def test_huge_counted_repetitions_are_refused(constraint):
    with pytest.raises(ConstraintError, match="counted repetition"):
        REG.prepare(constraint)
    REG.prepare(Constraint("regex", r"\d{3}-\d{4}"))  # ordinary counts pass
