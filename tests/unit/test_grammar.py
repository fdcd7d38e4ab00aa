import json

import pytest
import torch
from jsonschema.validators import validator_for

from models import tasks
from models.grammar import GrammarEngine, GrammarError
from models.tokenizer import EOS_ID, PAD_ID, encode_prompt


@pytest.fixture(scope="module", params=["xgrammar", "llguidance"])
def engine(dg, request):
    """Each grammar backend alone: every test here holds for both."""
    model, tok = dg
    return GrammarEngine(tok, model.config.text_config.vocab_size, EOS_ID, PAD_ID, engines=(request.param,))


def forced_text(engine, schema):
    hook = engine.canvas_hook("json_schema", schema, 64)
    pins = hook.pins(0, [])
    assert sorted(pins) == list(range(len(pins)))
    return engine.tokenizer.decode([pins[i] for i in sorted(pins)])


def test_seeded_canvas_nested_object(engine):
    schema = {"type": "object", "required": ["address"], "properties": {
        "address": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}
    assert forced_text(engine, schema) == '{"address":{"city":"'


def test_seeded_canvas_array_and_enum(engine):
    arr = {"type": "object", "required": ["tags"], "properties": {"tags": {"type": "array", "items": {"type": "string"}}}}
    assert forced_text(engine, arr).startswith('{"tags":[')
    enum = {"type": "object", "required": ["mode", "n"], "properties": {
        "mode": {"type": "string", "enum": ["manual"]}, "n": {"type": "integer"}}}
    assert forced_text(engine, enum) == '{"mode":"manual","n":'


def test_optional_first_property_pins_only_the_brace(engine):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert forced_text(engine, schema) == "{"


def test_longest_grammar_accepted_prefix(engine):
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}
    good = tok('{"age":41}', add_special_tokens=False)["input_ids"]
    assert engine.longest_prefix("json_schema", schema, good) == len(good)
    bad = tok('{"age":"41"}', add_special_tokens=False)["input_ids"]
    k = engine.longest_prefix("json_schema", schema, bad)
    # the first token carrying the string's opening quote is refused (with this vocabulary the
    # key's closing quote and ':' may share that token)
    assert tok.decode(bad[:k]) in ('{"age', '{"age":')
    assert '"' in tok.decode(bad[k:k + 1]) and 0 < k < len(bad)
    assert engine.longest_prefix("json_schema", schema, tok("[", add_special_tokens=False)["input_ids"]) == 0


def test_constrained_ar_is_valid_by_construction(engine, verifier):
    exs = list(tasks.examples("eval", 41, 12, kind="json"))
    for ex in exs:
        prompt = encode_prompt(verifier.tokenizer, ex.instruction)
        proc = engine.processor("json_schema", ex.schema)
        out = verifier.generate([prompt], max_new_tokens=200, logits_processors=[proc])[0]
        assert out.finished, out.text
        validator_for(ex.schema)(ex.schema).validate(json.loads(out.text))


def test_regex_constrained_ar(engine, verifier):
    proc = engine.processor("regex", r"[A-Z]{2}-\d{4}")
    out = verifier.generate([encode_prompt(verifier.tokenizer, "code?")], 20, logits_processors=[proc])[0]
    import re

    assert re.fullmatch(r"[A-Z]{2}-\d{4}", out.text)


def test_canvas_hook_masks_the_first_violation(engine):
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}
    hook = engine.canvas_hook("json_schema", schema, 8)
    hook.pins(0, [])
    ids = tok('{"age":"x"}', add_special_tokens=False)["input_ids"]
    logits = torch.full((8, engine.vocab_size), -5.0)
    for p, t in enumerate(ids[:8]):
        logits[p, t] = 5.0
    m = hook.mask(0, 0, [], logits)
    k = engine.longest_prefix("json_schema", schema, ids)
    assert m.positions.tolist() == [k]  # only the first violation is restricted, nothing else
    assert m.allowed.shape == (1, engine.vocab_size)
    assert not m.allowed[0, ids[k]]  # the rejected token is masked out there
    assert m.allowed[0].sum() > 0


def test_canvas_hook_pads_after_the_grammar_ends(engine):
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}}
    hook = engine.canvas_hook("json_schema", schema, 16)
    hook.pins(0, [])
    ids = tok('{"age":5}', add_special_tokens=False)["input_ids"] + [engine.eos_id]
    logits = torch.full((16, engine.vocab_size), -5.0)
    for p in range(16):
        logits[p, ids[p] if p < len(ids) else 40] = 5.0  # junk after <eos>
    m = hook.mask(0, 0, [], logits)
    assert m.positions.tolist() == list(range(len(ids), 16))
    assert m.allowed.sum(-1).tolist() == [2] * (16 - len(ids))  # <pad> or <eos> only
    assert m.allowed[:, engine.pad_id].all() and m.allowed[:, engine.eos_id].all()


def test_guided_drafts_are_more_often_valid(engine, drafter):
    from models.evaluate import schema_valid

    exs = list(tasks.examples("eval", 43, 24, kind="json"))
    prompts = [encode_prompt(drafter.tokenizer, e.instruction) for e in exs]
    free = drafter.draft(prompts, 128, seed=0)
    hooks = [engine.canvas_hook("json_schema", e.schema, drafter.canvas_length) for e in exs]
    guided = drafter.draft(prompts, 128, hooks=hooks, seed=0)
    n_free = sum(schema_valid(d.text, e.schema) for d, e in zip(free, exs))
    n_guided = sum(schema_valid(d.text, e.schema) for d, e in zip(guided, exs))
    assert n_guided >= n_free
    assert n_guided >= 0.75 * len(exs)


def test_uncompilable_constraints_are_refused(engine):
    with pytest.raises(GrammarError):
        engine.compile("sudoku", "x")
    with pytest.raises(GrammarError):
        engine.compile("regex", "(")


def test_tighten_schema_bounds_free_strings_and_arrays_only():
    from models.grammar import tighten_schema

    schema = {"type": "object", "properties": {
        "s": {"type": "string"}, "m": {"type": "string", "minLength": 50}, "e": {"type": "string", "enum": ["a"]},
        "u": {"type": "string", "format": "uri"}, "d": {"type": "string", "format": "date-time"},
        "a": {"type": "array", "items": {"type": "string"}}, "gone": False, "type": {"type": ["string", "null"]}}}
    t = tighten_schema(schema)["properties"]
    assert t["s"]["maxLength"] == 32 and t["m"]["maxLength"] == 50
    assert "maxLength" not in t["e"] and t["d"] == {"type": "string", "format": "date-time"}
    assert t["u"] == {"type": "string", "maxLength": 32}
    assert t["a"]["maxItems"] == 4 and t["a"]["items"]["maxLength"] == 32
    assert "gone" not in t and t["type"]["maxLength"] == 32
    assert schema["properties"]["s"] == {"type": "string"}  # the original is untouched


def test_guards_end_runaway_numbers_and_repeats(engine):
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}
    proc = engine.processor("json_schema", schema)
    prefix = tok('{"n":', add_special_tokens=False)["input_ids"]
    digit = tok.convert_tokens_to_ids("1")
    assert bool(engine.digits_only[digit])
    logits = torch.zeros(engine.vocab_size)
    out = proc(prefix + [digit] * 3, logits.clone())
    assert out[digit] == 0  # three repeats: still allowed
    out = proc(prefix + [digit] * 9, logits.clone())
    assert torch.isinf(out[engine.digits_only]).all()  # nine digits: numbers must end
    assert torch.isfinite(out).any()


# xgrammar refuses a pattern with a NUL character (a real JSONSchemaBench schema, Github_easy o27354)
NUL_PATTERN = {"type": "object", "required": ["path"],
               "properties": {"path": {"type": "string", "pattern": "^/[^\u0000]{1,12}$"}}}


def test_a_schema_one_engine_refuses_is_compiled_by_the_other(dg, verifier):
    model, tok = dg
    vocab = model.config.text_config.vocab_size
    with pytest.raises(GrammarError, match="xgrammar"):
        GrammarEngine(tok, vocab, EOS_ID, PAD_ID, engines=("xgrammar",)).compile("json_schema", NUL_PATTERN)
    both = GrammarEngine(tok, vocab, EOS_ID, PAD_ID)
    assert [b.name for b in both.backends] == ["xgrammar"]  # llguidance is built when first needed
    assert both.compile("json_schema", NUL_PATTERN).engine == "llguidance"
    assert [b.name for b in both.backends] == ["xgrammar", "llguidance"]
    assert both.compile("json_schema", {"type": "object"}).engine == "xgrammar"  # the first that accepts
    prompt = encode_prompt(tok, "Give the path as JSON.")
    out = verifier.generate([prompt], 48, logits_processors=[both.processor("json_schema", NUL_PATTERN)])[0]
    assert out.finished, out.text
    validator_for(NUL_PATTERN)(NUL_PATTERN).validate(json.loads(out.text))


def test_unknown_engines_are_refused(dg):
    model, tok = dg
    with pytest.raises(ValueError, match="grammar engines"):
        GrammarEngine(tok, model.config.text_config.vocab_size, EOS_ID, PAD_ID, engines=("outlines",))
