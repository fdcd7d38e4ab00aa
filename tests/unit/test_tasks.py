import json

from jsonschema.validators import validator_for

from models import tasks


def test_examples_are_deterministic():
    a = [tasks.example("train", 5, i) for i in range(20)]
    b = [tasks.example("train", 5, i) for i in range(20)]
    assert a == b
    assert a != [tasks.example("train", 6, i) for i in range(20)]


def test_train_and_eval_never_share_a_prompt():
    train = {e.instruction for s in range(3) for e in tasks.examples("train", s, 1500)}
    evals = {e.instruction for s in range(3) for e in tasks.examples("eval", s, 300)}
    assert train and evals
    assert not train & evals


def test_json_targets_validate_against_their_schema():
    kinds = set()
    for ex in tasks.examples("train", 1, 400, kind="json"):
        instance = json.loads(ex.target)
        validator_for(ex.schema)(ex.schema).validate(instance)
        assert json.dumps(ex.schema, separators=(",", ":")) in ex.instruction
        for prop in ex.schema["properties"].values():
            kinds.add(prop["type"] + ("-enum" if "enum" in prop else ""))
    assert {"string", "integer", "number", "boolean", "string-enum", "array", "object"} <= kinds


def test_optional_fields_are_sometimes_left_out():
    omitted = 0
    for ex in tasks.examples("train", 2, 300, kind="json"):
        omitted += len(ex.schema["properties"]) - len(json.loads(ex.target))
    assert omitted > 0


def test_prose_examples_have_no_schema():
    exs = list(tasks.examples("eval", 0, 20, kind="prose"))
    assert all(e.schema is None and e.kind == "prose" and e.target.endswith(".") for e in exs)
