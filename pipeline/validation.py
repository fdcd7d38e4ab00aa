"""Constraint validators and their registry.

A validator checks a finished answer text against a :class:`Constraint` and says why it fails.
``prepare`` runs once per request at the edge (so a broken schema is a 400 before any model runs);
``validate`` runs on drafts and repairs. Compiled validators are cached by a hash of the spec.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Callable, Protocol

from . import telemetry
from .interfaces import Constraint, ConstraintKind, Verdict
from .json_spans import value_spans


class ConstraintError(ValueError):
    """The constraint itself is unusable (a 400 for the client)."""


class Validator(Protocol):
    def prepare(self, spec: Any) -> None:
        """Raise :class:`ConstraintError` naming the problem if ``spec`` cannot be used."""
        ...

    def validate(self, spec: Any, text: str) -> Verdict: ...


def spec_key(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


PATTERN_TIMEOUT_S = 0.5


def _timed_pattern(validator, pattern, instance, schema):
    """``pattern`` keyword with a time cap (jsonschema's own uses ``re``, which can backtrack for
    minutes on a hostile pattern)."""
    import regex
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "string"):
        return
    try:
        if regex.search(pattern, instance, timeout=PATTERN_TIMEOUT_S) is None:
            yield ValidationError(f"{instance!r} does not match {pattern!r}")
    except TimeoutError:
        yield ValidationError(f"pattern {pattern!r} took longer than {PATTERN_TIMEOUT_S} s to match")
    except regex.error as e:
        yield ValidationError(f"pattern {pattern!r} is not a valid regex: {e}")


@lru_cache(maxsize=None)
def _timed_validator(base: type) -> type:
    """``base`` (a jsonschema dialect's validator class) with :func:`_timed_pattern`: one class per
    dialect, made once (``extend`` builds a new class, which costs more than a validation)."""
    from jsonschema.validators import extend

    return extend(base, {"pattern": _timed_pattern})


@lru_cache(maxsize=512)
def _compiled_schema(schema_json: str):
    from jsonschema.validators import validator_for

    schema = json.loads(schema_json)
    return _timed_validator(validator_for(schema))(schema)


def compiled_schema(schema: Any):
    return _compiled_schema(json.dumps(schema, sort_keys=True))  # keyed by its canonical text


def _json_path(path) -> str:
    out = "$"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def nesting_depth(value: Any) -> int:
    """Depth of nested objects/arrays (iterative, so a hostile document cannot blow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node)
    return deepest


MAX_REPEAT = 1000  # largest counted repetition ({n}, {n,m}) a pattern may ask for


def check_pattern(pattern: str, where: str) -> None:
    """Refuse counted repetitions beyond :data:`MAX_REPEAT`: ``a{1000000}`` compiles to an automaton
    (grammar) or a match loop of that size for nothing a model could produce anyway."""
    import re

    for lo, hi in re.findall(r"(?<!\\)\{(\d+)(?:,(\d*))?\}", pattern):
        if int(lo) > MAX_REPEAT or (hi and int(hi) > MAX_REPEAT):
            raise ConstraintError(f"{where}: counted repetition above {MAX_REPEAT} is not supported")


_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")


def _pointer(doc: Any, ref: str) -> Any:
    """The node a local ``$ref`` ("#" or "#/a/b~1c") names; ConstraintError if it names none."""
    from models.schema_variants import json_pointer

    try:
        return json_pointer(doc, ref)
    except LookupError:
        raise ConstraintError(f"$ref {ref!r} does not resolve inside the schema") from None


def _anchors(nodes) -> dict[str, Any]:
    """Plain-name fragments (``"#name"``) -> the schema node that declares them."""
    anchors = {}
    for node in nodes:
        for k in ("$anchor", "$id", "id"):
            name = node.get(k)
            if isinstance(name, str) and name:
                anchors[name if k != "$anchor" else "#" + name] = node
    return anchors


def _resolve(schema: Any, ref: str, anchors: dict[str, Any]) -> Any:
    if ref == "#" or ref.startswith("#/"):
        return _pointer(schema, ref)
    if ref in anchors:
        return anchors[ref]
    raise ConstraintError(f"$ref {ref!r}: only references inside the schema ('#', '#/...' or "
                          "'#anchor') are supported")


def _subschemas(schema: Any) -> dict[int, tuple[str, dict]]:
    """Every dict reachable in ``schema``, by identity, with the JSON pointer it was first met at."""
    found: dict[int, tuple[str, dict]] = {}
    todo = [("#", schema)]
    while todo:
        where, node = todo.pop()
        if isinstance(node, dict):
            if id(node) in found:
                continue
            found[id(node)] = (where, node)
            todo.extend((f"{where}/{k.replace('~', '~0').replace('/', '~1')}", v) for k, v in node.items())
        elif isinstance(node, list):
            todo.extend((f"{where}/{i}", v) for i, v in enumerate(node))
    return found


_REF_OVERRIDES_SIBLINGS = ("draft-04", "draft-06", "draft-07", "draft-03")


def _needs(node: dict, ref_target: Any, ref_only: bool) -> tuple[list[Any], list[list[Any]]]:
    """What ``node`` certainly demands of its instances' parts, as (every one of these subschemas
    must have a finite instance, at least one of each of these groups must). Conservative: only
    what holds for every instance (an object-only schema's required properties, an array-only
    schema's first ``minItems`` items, ``$ref``/``allOf``/``anyOf``/``oneOf``); anything else is
    assumed satisfiable, so the check never refuses a schema that has an instance."""
    every: list[Any] = [] if ref_target is None else [ref_target]
    if ref_only:
        return every, []
    every += [c for c in node.get("allOf", []) if isinstance(c, (dict, bool))] if isinstance(node.get("allOf"), list) else []
    groups = [[c for c in node[k] if isinstance(c, (dict, bool))] for k in ("anyOf", "oneOf")
              if isinstance(node.get(k), list) and node[k]]
    kinds = node.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else None
    if kinds == ["object"] and isinstance(node.get("required"), list):
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        extra = node.get("additionalProperties", True)
        for key in node["required"]:
            if key in props:
                every.append(props[key])
            elif not node.get("patternProperties"):
                every.append(extra)
    if kinds == ["array"] and isinstance(node.get("minItems"), int) and node["minItems"] > 0:
        prefix = node.get("prefixItems") if isinstance(node.get("prefixItems"), list) else (
            node["items"] if isinstance(node.get("items"), list) else [])
        rest = node.get("items") if isinstance(node.get("items"), (dict, bool)) else node.get("additionalItems", True)
        for i in range(min(node["minItems"], len(prefix) + 1)):
            every.append(prefix[i] if i < len(prefix) else rest)
    return every, groups


def check_finite(schema: Any) -> None:
    """Refuse a schema no finite JSON value satisfies, naming why: a required recursion such as
    ``{"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
    "required": ["next"]}}, "$ref": "#/$defs/n"}`` (every instance must contain another instance),
    or a required part whose schema is ``false``. No model can produce such an answer, and a
    grammar engine asked for the text it forces would write ``{"next":{"next":...`` forever.

    The least fixed point of "has a finite instance" over the subschemas, starting from none:
    a subschema gains it once everything it certainly demands (:func:`_needs`) has it."""
    if isinstance(schema, bool):
        if not schema:
            raise ConstraintError("JSON Schema `false` has no instance")
        return
    found = _subschemas(schema)
    anchors = _anchors(n for _, n in found.values())
    draft = str(schema.get("$schema", "")) if isinstance(schema, dict) else ""
    ref_only = any(d in draft for d in _REF_OVERRIDES_SIBLINGS)
    needs = {}
    for key, (_, node) in found.items():
        ref = node.get("$ref")
        target = _resolve(schema, ref, anchors) if isinstance(ref, str) else None
        needs[key] = _needs(node, target, ref_only and target is not None)

    def ok(sub, finite) -> bool:
        return sub is True or (isinstance(sub, dict) and id(sub) in finite)

    finite: set[int] = set()
    changed = True
    while changed:
        changed = False
        for key, (every, groups) in needs.items():
            if key not in finite and all(ok(s, finite) for s in every) and all(
                    any(ok(s, finite) for s in g) for g in groups):
                finite.add(key)
                changed = True
    if id(schema) in finite:
        return
    # Walk from the root along a demand that fails, to name the cycle (or the `false` it ends at).
    trail, node = [], schema
    while isinstance(node, dict) and id(node) not in {id(n) for n in trail}:
        trail.append(node)
        every, groups = needs[id(node)]
        bad = [s for s in every if not ok(s, finite)] or [s for g in groups if not any(ok(x, finite) for x in g)
                                                           for s in g]
        node = bad[0] if bad else None
    names = " -> ".join(found[id(n)][0] for n in trail)
    if isinstance(node, dict):
        raise ConstraintError(f"JSON Schema has no finite instance: every value must contain another value of "
                              f"the same schema (required recursion {names} -> {found[id(node)][0]})")
    raise ConstraintError(f"JSON Schema has no instance: {names} requires a part whose schema is false")


def check_refs(schema: Any, max_evaluations: int = 10_000) -> None:
    """Refuse ``$ref`` use that would stall a validator or a grammar compiler:

    * a non-local ``$ref`` (no fetching of remote documents: ``"#"``, ``"#/..."`` or a plain-name
      fragment ``"#name"`` naming an ``$anchor`` / ``"$id": "#name"`` in the same document);
    * a cycle of in-place applicators (``$ref``, ``allOf``/``anyOf``/``oneOf``, ``not``,
      ``if``/``then``/``else``) that returns to a schema without descending into the instance:
      ``{"$ref": "#"}`` or ``{"allOf": [{"$ref": "#"}]}`` recurse forever on any instance;
    * in-place fan-out that multiplies evaluations ("billion laughs": ``a1 = allOf[a0, a0]``,
      ``a2 = allOf[a1, a1]``, ...): more than ``max_evaluations`` schema evaluations of one value.

    Recursion through ``properties``/``items``/... is fine: each step consumes part of the answer.
    """
    nodes: dict[int, Any] = {}
    edges: dict[int, list[int]] = {}
    todo = [schema]
    while todo:  # every dict reachable in the document, keyed by identity
        node = todo.pop()
        if isinstance(node, dict):
            if id(node) in nodes:
                continue
            nodes[id(node)] = node
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
    anchors = _anchors(nodes.values())
    for key, node in nodes.items():
        out = []
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _resolve(schema, ref, anchors)
            if isinstance(target, dict):
                out.append(id(target))
        for k in _IN_PLACE_LISTS:
            out += [id(c) for c in node.get(k, []) if isinstance(c, dict)] if isinstance(node.get(k), list) else []
        out += [id(node[k]) for k in _IN_PLACE_ONE if isinstance(node.get(k), dict)]
        edges[key] = out
    # evaluations(n) = 1 + sum(evaluations(child)); a node met again on the current path is a cycle
    done: dict[int, int] = {}
    for start in nodes:
        if start in done:
            continue
        path, stack = {start}, [(start, iter(edges[start]))]
        while stack:
            key, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.discard(key)
                done[key] = min(max_evaluations + 1, 1 + sum(done[c] for c in edges[key]))
                if done[key] > max_evaluations:
                    raise ConstraintError(f"JSON Schema applies more than {max_evaluations} subschemas to one "
                                          "value (nested allOf/anyOf/oneOf/$ref fan-out)")
            elif child in path:
                raise ConstraintError("JSON Schema $ref/allOf/anyOf/oneOf recursion that never descends into "
                                      "the value (e.g. {\"$ref\": \"#\"}) cannot be validated")
            elif child not in done:
                path.add(child)
                stack.append((child, iter(edges[child])))


def _through_ref(schema: Any, schema_path) -> bool:
    """Whether a validation error's schema path (jsonschema leaves ``$ref`` out of it) passes
    through a ``$ref``: a step the schema node does not have, where the node is a reference."""
    node = schema
    for key in schema_path:
        if isinstance(node, dict) and key not in node:
            return "$ref" in node
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    return False


class JsonSchemaValidator:
    """JSON Schema, draft picked from ``$schema``; errors carry their JSON path and the span of the
    answer they point at. Size and nesting caps keep one hostile schema from stalling a replica.
    The schemas ``prepare`` accepted are remembered (the last ``remember``), so a schema sent again
    is not checked against its metaschema again: that check costs more than validating an answer."""

    def __init__(self, max_schema_bytes: int = 64_000, max_depth: int = 24, remember: int = 1024):
        self.max_schema_bytes = max_schema_bytes
        self.max_depth = max_depth
        self.remember = remember
        self._accepted: OrderedDict[str, None] = OrderedDict()  # spec_key of each, most recent last
        self._lock = threading.Lock()

    def prepare(self, spec: Any) -> None:
        if not isinstance(spec, (dict, bool)):
            raise ConstraintError("response_format.json_schema.schema must be a JSON object")
        key = spec_key(spec)
        with self._lock:
            if key in self._accepted:
                self._accepted.move_to_end(key)
                return
        self._check(spec)  # a refusal is not remembered: it raises every time
        with self._lock:
            self._accepted[key] = None
            while len(self._accepted) > self.remember:
                self._accepted.popitem(last=False)

    def _check(self, spec: Any) -> None:
        from jsonschema.exceptions import SchemaError
        from jsonschema.validators import validator_for

        size = len(json.dumps(spec))
        if size > self.max_schema_bytes:
            raise ConstraintError(f"JSON Schema of {size} bytes exceeds the limit of {self.max_schema_bytes}")
        depth = nesting_depth(spec)
        if depth > self.max_depth:
            raise ConstraintError(f"JSON Schema nesting depth {depth} exceeds the limit of {self.max_depth}")
        try:
            validator_for(spec).check_schema(spec)
        except SchemaError as e:
            where = _json_path(e.path)
            raise ConstraintError(f"invalid JSON Schema at {where}: {e.message}") from None
        check_refs(spec)
        check_finite(spec)
        stack = [spec]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("pattern"), str):
                    check_pattern(node["pattern"], "JSON Schema pattern")
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)

    def validate(self, spec: Any, text: str) -> Verdict:
        try:
            instance = json.loads(text)
        except ValueError as e:
            return Verdict(False, (f"not JSON: {e}",), spans=(_syntax_span(e, text),), keywords=("json",))
        errors = sorted(compiled_schema(spec).iter_errors(instance), key=lambda e: [str(p) for p in e.path])[:10]
        if not errors:
            return Verdict(True)
        spans = value_spans(text)
        where = [spans.get(tuple(e.path), (0, len(text))) for e in errors]
        keywords = tuple(dict.fromkeys([str(e.validator) for e in errors]
                                       + ["$ref" for e in errors if _through_ref(spec, e.absolute_schema_path)]))
        return Verdict(False,
                       tuple(f"{_json_path(e.path)} (chars {a}-{b}): {e.message}" for e, (a, b) in zip(errors, where)),
                       tuple(_json_path(e.path) for e in errors), tuple(where), keywords)


class JsonObjectValidator:
    def prepare(self, spec: Any) -> None:
        return None

    def validate(self, spec: Any, text: str) -> Verdict:
        try:
            value = json.loads(text)
        except ValueError as e:
            return Verdict(False, (f"not JSON: {e}",), spans=(_syntax_span(e, text),))
        if not isinstance(value, dict):
            return Verdict(False, (f"$: expected a JSON object, got {type(value).__name__}",))
        return Verdict(True)


def _syntax_span(error: ValueError, text: str) -> tuple[int, int]:
    """Where a text stops being JSON: from the parser's failure position to the end (at least one
    character; past the end for a text cut short). Example: ``'{"a": 1'`` -> ``(7, 8)``."""
    pos = getattr(error, "pos", 0)
    return pos, max(pos + 1, len(text))


class RegexValidator:
    """Full match of the whole answer, with a time cap against catastrophic backtracking."""

    def __init__(self, timeout_s: float = 1.0, max_pattern_chars: int = 2000):
        self.timeout_s = timeout_s
        self.max_pattern_chars = max_pattern_chars

    def prepare(self, spec: Any) -> None:
        import regex

        if not isinstance(spec, str) or not spec:
            raise ConstraintError("response_format.regex.pattern must be a non-empty string")
        if len(spec) > self.max_pattern_chars:
            raise ConstraintError(f"regex pattern longer than {self.max_pattern_chars} characters")
        try:
            regex.compile(spec)
        except regex.error as e:
            raise ConstraintError(f"invalid regex pattern: {e}") from None
        check_pattern(spec, "regex pattern")

    def validate(self, spec: Any, text: str) -> Verdict:
        import regex

        try:
            ok = regex.fullmatch(spec, text, timeout=self.timeout_s) is not None
        except TimeoutError:
            return Verdict(False, (f"regex match exceeded {self.timeout_s:g} s",))
        return Verdict(ok, () if ok else ("answer does not fully match the pattern",))


class SudokuValidator:
    """An 81-character board (row-major, digits 1-9) that keeps the puzzle's clues (puzzle uses
    ``0`` or ``.`` for blanks) and has no repeated digit in any row, column or 3x3 box."""

    def prepare(self, spec: Any) -> None:
        if not isinstance(spec, str) or len(spec) != 81 or any(c not in "0123456789." for c in spec):
            raise ConstraintError("sudoku puzzle must be 81 characters of digits, with 0 or . for blanks")
        problems = self._conflicts(spec.replace(".", "0"))
        if problems:
            raise ConstraintError(f"sudoku puzzle breaks its own rules: {problems[0]}")

    @staticmethod
    def _conflicts(board: str) -> list[str]:
        from models.sudoku import UNITS  # rows, then columns, then boxes

        out = []
        for u, cells in enumerate(UNITS):
            digits = [board[i] for i in cells if board[i] != "0"]
            dup = sorted({d for d in digits if digits.count(d) > 1})
            if dup:
                out.append(f"{('row', 'column', 'box')[u // 9]} {u % 9 + 1} repeats {', '.join(dup)}")
        return out

    def validate(self, spec: Any, text: str) -> Verdict:
        board = "".join(text.split())
        if len(board) != 81 or any(c not in "123456789" for c in board):
            return Verdict(False, ("board must be 81 digits 1-9",))
        errors = [f"cell {i + 1} must keep clue {c}" for i, (c, b) in enumerate(zip(spec, board))
                  if c not in "0." and c != b]
        errors += self._conflicts(board)
        return Verdict(not errors, tuple(errors[:10]))


class ValidatorRegistry:
    """Validators by constraint kind; custom ones register by name (from config)."""

    def __init__(self) -> None:
        self._validators: dict[str, Validator] = {}

    def register(self, kind: str, validator: Validator) -> None:
        self._validators[kind] = validator

    def kinds(self) -> list[str]:
        return sorted(self._validators)

    def get(self, kind: str) -> Validator:
        if kind not in self._validators:
            raise ConstraintError(f"unsupported response_format type {kind!r}; supported: {self.kinds()}")
        return self._validators[kind]

    def prepare(self, constraint: Constraint) -> None:
        self.get(constraint.kind).prepare(constraint.spec)

    def validate(self, constraint: Constraint, text: str) -> Verdict:
        return self.get(constraint.kind).validate(constraint.spec, text)


def default_registry(extra: dict[str, Callable[[], Validator]] | None = None) -> ValidatorRegistry:
    reg = ValidatorRegistry()
    reg.register(ConstraintKind.JSON_SCHEMA, JsonSchemaValidator())
    reg.register(ConstraintKind.JSON_OBJECT, JsonObjectValidator())
    reg.register(ConstraintKind.REGEX, RegexValidator())
    reg.register(ConstraintKind.SUDOKU, SudokuValidator())
    for name, factory in (extra or {}).items():
        reg.register(name, factory())
    return reg


def load_validator_factory(dotted: str) -> Callable[[], Validator]:
    """``package.module:ClassName`` -> a zero-argument factory (for validators named in config)."""
    import importlib

    module, _, attr = dotted.partition(":")
    if not module or not attr:
        raise ValueError(f"validator path must look like 'package.module:Name', got {dotted!r}")
    return getattr(importlib.import_module(module), attr)


class RegistryValidator:
    """``ValidationService`` over a :class:`ValidatorRegistry` (what the Validator replica serves)."""

    def __init__(self, registry: ValidatorRegistry | None = None):
        self.registry = registry or default_registry()

    async def validate(self, constraint, text, trace=None):
        with telemetry.span("validator.validate", trace, attrs={"dgserve.constraint": constraint.kind}) as sp:
            verdict = self.registry.validate(constraint, text)
            telemetry.attributes(sp, {"dgserve.validation.ok": verdict.ok,
                                      "dgserve.validation.errors": len(verdict.errors)})
            if verdict.errors:
                sp.set_attribute("dgserve.validation.first_error", verdict.errors[0][:200])
            return verdict
