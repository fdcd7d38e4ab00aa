import json
import random

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


def _counting(verifier):
    """The verifier's model with its forwards counted."""
    calls = []
    inner = verifier.lm.logits

    def logits(*a, **kw):
        calls.append(a[0].shape[1])
        return inner(*a, **kw)

    return calls, logits


def test_the_processor_jumps_over_what_the_grammar_forces(engine):
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["name", "age"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"}}}
    proc = engine.processor("json_schema", schema)
    forced = proc.jump([], 64)
    # the forced text is {"name":" ; its last token is left to the model (it may merge with the value)
    assert forced and '{"name":"'.startswith(tok.decode(forced)) and len(forced) < len(tok('{"name":"')["input_ids"]) + 1
    assert proc.jump([], 1) == forced[:1]
    after = tok('{"name":"Ada"', add_special_tokens=False)["input_ids"]
    assert tok.decode(proc.jump(after, 64)) in (',"age', ',"age":', ',')  # between two required keys
    engine.jump_forward = False
    try:
        assert engine.processor("json_schema", schema).jump([], 64) == []
    finally:
        engine.jump_forward = True


def test_a_matchers_mask_follows_its_state(engine):
    """allowed() asked again in one state, after a probe of the forced text, and after each move
    equals what a fresh matcher over the same tokens allows."""
    tok = engine.tokenizer
    schema = {"type": "object", "required": ["name", "n"], "properties": {
        "name": {"type": "string"}, "n": {"type": "integer"}}}
    ids = tok('{"name":"Ada","n":12}', add_special_tokens=False)["input_ids"]
    m = engine.matcher("json_schema", schema)
    for i, t in enumerate(ids):
        fresh = engine.matcher("json_schema", schema, ids[:i])
        assert torch.equal(m.allowed(), fresh.allowed())
        forced = m.forced_bytes(16)  # probes without moving the matcher
        assert forced == fresh.forced_bytes(16)
        assert torch.equal(m.allowed(), fresh.allowed())
        rejected = int((~m.allowed()).nonzero()[0])
        assert not m.accept_token(rejected)  # a rejected token leaves the state (and its mask) as it was
        assert torch.equal(m.allowed(), fresh.allowed())
        assert m.accept_token(t)
    assert m.allowed()[EOS_ID] and not engine.matcher("json_schema", schema, ids[:-1]).allowed()[EOS_ID]


def test_jump_forward_takes_fewer_forwards_for_the_same_answers(engine, verifier, monkeypatch):
    exs = list(tasks.examples("eval", 43, 12, kind="json"))
    outs, forwards = {}, {}
    for jump in (False, True):
        engine.jump_forward = jump
        calls, counted = _counting(verifier)
        monkeypatch.setattr(verifier.lm, "logits", counted)
        try:
            outs[jump] = [verifier.generate([encode_prompt(verifier.tokenizer, ex.instruction)], 200,
                                            logits_processors=[engine.processor("json_schema", ex.schema)])[0]
                          for ex in exs]
        finally:
            engine.jump_forward = True
            monkeypatch.undo()
        forwards[jump] = calls
    for ex, out in zip(exs, outs[True]):
        assert out.finished, out.text
        validator_for(ex.schema)(ex.schema).validate(json.loads(out.text))
    assert max(forwards[False]) > 1 and max(forwards[True][1:]) > 1  # some steps fed several tokens
    assert len(forwards[True]) < 0.85 * len(forwards[False])
    assert sum(a.text == b.text for a, b in zip(outs[True], outs[False])) >= 0.75 * len(exs)
    # the tokens count as produced: the budget holds them
    engine.jump_forward = True
    short = verifier.generate([encode_prompt(verifier.tokenizer, exs[0].instruction)], 5,
                              logits_processors=[engine.processor("json_schema", exs[0].schema)])[0]
    assert len(short.token_ids) == 5 and not short.finished


# string patterns from JSONSchemaBench's Github_easy: unbounded repetitions a small model never ends
REAL_PATTERNS = [
    (r"^$|(^(?:\S+\s+){0,99}\S+$)", 1, 5000),
    (r"^[^@^\s]+@[^@^\.^\s]+(\.[^@^\.^\s]+)+$", 0, None),
    (r"^$|^\+?([\d\s()-]){9,20}$", 0, None),
    (r"^[ !\"#$%&\'()*+,\-./0-9:;<=>?@A-Z\[\\\]\^_`a-z{\|}]+$", 30, 30),
    (r"^[a-zA-Z0-9_-]*$", 0, 64),
    (r"^(\([0-9]{3}\))?[0-9]{3}-[0-9]{4}$", 0, None),
    (r"[]a-c]+x*?", 0, None),
]


@pytest.mark.parametrize("pattern,min_length,max_length", REAL_PATTERNS)
def test_bounded_patterns_admit_only_bounded_strings_of_the_original(pattern, min_length, max_length):
    import re

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from models.schema_variants import bounded_pattern

    bounded = bounded_pattern(pattern, min_length, max_length)
    assert "+" not in re.sub(r"\\.|\[[^\]]*\]", "", bounded).replace("\\", "") and "*" not in re.sub(
        r"\\.|\[(?:\\.|[^\]])*\]", "", bounded)  # no unbounded repetition left outside classes

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(bounded, fullmatch=True))
    def check(s):
        assert re.search(pattern, s), (bounded, s)
        assert len(s) <= 200

    check()


def test_a_string_pattern_with_unbounded_repetitions_still_ends(engine, verifier):
    schema = {"type": "object", "additionalProperties": False, "required": ["question", "answer"], "properties": {
        "answer": {"maxLength": 5000, "minLength": 1, "pattern": r"^$|(^(?:\S+\s+){0,99}\S+$)", "type": "string"},
        "question": {"maxLength": 5000, "minLength": 1, "pattern": r"^$|(^(?:\S+\s+){0,99}\S+$)", "type": "string"}}}
    prompt = encode_prompt(verifier.tokenizer, "Ask a question and answer it, as JSON: " + json.dumps(schema))
    out = verifier.generate([prompt], 256, logits_processors=[engine.processor("json_schema", schema)])[0]
    assert out.finished, out.text
    validator_for(schema)(schema).validate(json.loads(out.text))


def test_tighten_schema_writes_out_what_grammars_would_drop():
    from models.grammar import tighten_schema

    s = {"type": "string"}
    # allOf over a local $ref (a real Github_easy shape): one schema with both branches' keys
    schema = {"definitions": {"pets": {"type": "object", "properties": {"cat": s, "dog": s}, "required": ["dog"]}},
              "properties": {"more": {"allOf": [{"$ref": "#/definitions/pets"},
                                                {"type": "object", "properties": {"horse": s}, "required": ["horse"]}]}},
              "required": ["more"]}
    more = tighten_schema(schema)["properties"]["more"]
    assert "allOf" not in more and more["type"] == "object" and more["required"] == ["dog", "horse"]
    assert set(more["properties"]) == {"cat", "dog", "horse"}
    # branches that disagree, or a $ref that could bring the allOf back, are left as written
    clash = {"allOf": [{"type": "string", "maxLength": 3}, {"type": "string", "maxLength": 5}]}
    assert "allOf" in tighten_schema(clash)
    loop = {"definitions": {"Foo": {"type": "object", "properties": {"kids": {"allOf": [{"$ref": "#/definitions/Foo"}]}}}},
            "properties": {"Foo": {"$ref": "#/definitions/Foo"}}}
    assert "allOf" in tighten_schema(loop)["definitions"]["Foo"]["properties"]["kids"]
    # a required key the node does not list is listed (grammars allow no other keys)
    top = tighten_schema({"type": "object", "properties": {}, "required": ["top"]})
    assert "top" in top["properties"]
    typed = tighten_schema({"type": "object", "additionalProperties": {"type": "integer"}, "required": ["n"]})
    assert typed["properties"]["n"] == {"type": "integer"}
    # a pattern is bounded instead of given a maxLength the grammar would ignore
    p = tighten_schema({"type": "string", "pattern": "^[a-z]+$"})
    assert p == {"type": "string", "pattern": "^[a-z]{1,32}$"}
    # a $ref to a draft-04 anchor ("id": "#name") becomes the JSON pointer engines resolve
    anchored = {"definitions": {"drive": {"id": "#drive", "type": "object", "required": ["limit"],
                                          "properties": {"limit": {"type": "number"}}}},
                "type": "object", "properties": {"jump": {"$ref": "#drive"}}}
    assert tighten_schema(anchored)["properties"]["jump"] == {"$ref": "#/definitions/drive"}
    # if/then/else (no grammar expresses it): what either branch requires is required
    cond = {"type": "object", "properties": {"a": s, "b": {"type": "integer"}, "c": {"enum": ["x", "y"]}},
            "if": {"properties": {"c": {"const": "x"}}}, "then": {"required": ["a", "b"]}, "else": {"required": ["a", "c"]}}
    assert tighten_schema(cond)["required"] == ["a", "b", "c"]
    # multipleOf 0.01 on a number: decoded as an integer, a multiple of it
    assert tighten_schema({"type": "number", "multipleOf": 0.01})["type"] == "integer"
    assert tighten_schema({"type": "number", "multipleOf": 3})["type"] == "number"


@pytest.mark.parametrize("schema", [
    {"definitions": {"pets": {"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"]}},
     "type": "object", "required": ["more"], "properties": {"more": {"allOf": [
         {"$ref": "#/definitions/pets"}, {"type": "object", "properties": {"horse": {"type": "string"}},
                                          "required": ["horse"]}]}}},
    {"type": "object", "properties": {}, "required": ["top"]},
    {"$schema": "http://json-schema.org/draft-04/schema#",
     "definitions": {"drive": {"id": "#drive", "type": "object", "required": ["limit"],
                               "properties": {"limit": {"type": "number", "minimum": 0}}}},
     "type": "object", "required": ["jump"], "properties": {"jump": {"$ref": "#drive"}}},
    {"type": "object", "required": ["amount"], "additionalProperties": False,
     "properties": {"amount": {"type": "number", "minimum": 0, "multipleOf": 0.01}}},
])
def test_written_out_schemas_decode_to_valid_answers(engine, verifier, schema):
    prompt = encode_prompt(verifier.tokenizer, "Answer as JSON: " + json.dumps(schema))
    out = verifier.generate([prompt], 128, logits_processors=[engine.processor("json_schema", schema)])[0]
    assert out.finished, out.text
    validator_for(schema)(schema).validate(json.loads(out.text))


def test_compiled_grammars_outlive_the_engine_on_disk(dg, verifier, tmp_path):
    model, tok = dg
    vocab = model.config.text_config.vocab_size
    schema = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
    prompt = encode_prompt(tok, "Which city? Answer as JSON.")

    def answer(engine):
        return verifier.generate([prompt], 32, logits_processors=[engine.processor("json_schema", schema)])[0]

    first = GrammarEngine(tok, vocab, EOS_ID, PAD_ID, engines=("xgrammar",), cache_dir=str(tmp_path))
    want = answer(first)
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and first.backends[0].disk.stores == 1
    # a new engine (a replica's next life) loads the grammar instead of compiling it
    second = GrammarEngine(tok, vocab, EOS_ID, PAD_ID, engines=("xgrammar",), cache_dir=str(tmp_path))
    assert answer(second).token_ids == want.token_ids and want.finished
    assert second.backends[0].disk.hits == 1 and second.backends[0].disk.stores == 0
    # a damaged file is compiled again and replaced
    files[0].write_text("{not a grammar")
    third = GrammarEngine(tok, vocab, EOS_ID, PAD_ID, engines=("xgrammar",), cache_dir=str(tmp_path))
    assert answer(third).token_ids == want.token_ids
    assert third.backends[0].disk.stores == 1 and json.loads(files[0].read_text())


def test_the_engines_encoder_writes_what_the_tokenizer_writes(engine):
    """``GrammarEngine.encode`` (the fast tokenizer's own encoder) against the tokenizer's
    ``__call__``, on forced texts, whitespace, non-ASCII and special tokens' strings."""
    tok = engine.tokenizer
    texts = ['{"name":"', '","age":', ',"tags":["', '"}', " ", "a  b\n\tc", '{"é":"ü"}', "<eos>", "<pad>x",
             '{"x":{"y":[1,2.5e-3,true,null]}}', ""]
    rng = random.Random(0)
    alphabet = '{}[]":,abcdefghijklmnopqrstuvwxyz 0123456789\n\té<>_-'
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    for t in texts:
        assert engine.encode(t) == tok(t, add_special_tokens=False)["input_ids"], t
