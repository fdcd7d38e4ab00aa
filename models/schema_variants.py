"""Narrower JSON Schemas to decode under when the schema itself did not give a valid answer.

Each variant admits a subset of the original's instances *as far as the grammar enforces it*;
the answer is always validated against the original, so a variant can only turn a refusal into a
valid answer, never an invalid one into a success. Torch-free: the orchestration builds them.

* :func:`minimal_schema`: the shortest answers: optional properties left out, free strings and
  arrays bounded to their minimum, for an answer that ran past ``max_tokens`` under the schema;
* :func:`one_of_branches`: the schema with its first ``oneOf`` narrowed to one branch at a time.
  Grammars decode ``oneOf`` as ``anyOf``, so an answer may match several branches (invalid under
  ``oneOf``); decoded under one branch with no additional properties, it usually matches just that one.
"""

from __future__ import annotations

import copy
import re
from typing import Any

_COUNTED = re.compile(r"\{(\d+)(?:(,)(\d*))?\}")
# the whole pattern one atom repeated: ^[class]+$, ^\d{2,}$, ^.*$ (anchors optional)
_ONE_ATOM = re.compile(r"\^?(\[(?:\\.|[^\]\\])+\]|\\[A-Za-z]|\.)(\+|\*|\{\d+(?:,\d*)?\})\$?")


def bounded_pattern(pattern: str, min_length: int = 0, max_length: int | None = None, cap: int = 8,
                    atom_cap: int = 32) -> str:
    """A regex for a sublanguage of ``pattern`` whose strings are bounded: every unbounded
    repetition (``+``, ``*``, ``{n,}``), and every counted one above ``atom_cap`` (``{0,99}``),
    repeats at most ``max(n, cap)`` times. Grammars ignore a string's ``maxLength`` beside its
    ``pattern`` (xgrammar), so a small model can write one string until ``max_tokens`` runs out;
    under the bounded pattern it cannot. A pattern that is one atom repeated (``^[a-z0-9]+$``)
    takes the schema's ``minLength``/``maxLength`` as its count instead (at most
    ``max(minLength, atom_cap)`` without a ``maxLength``). With a ``minLength``, alternatives that
    match only the empty string (``^$|...``) are left out. Escapes and character classes are left
    as they are; a lazy ``?`` after a rewritten repetition is dropped (same language).

    Example: ``^(\S+\s+){0,99}\S+$`` -> ``^(\S{1,8}\s{1,8}){0,8}\S{1,8}$``; ``^[a-z]+$`` with
    ``minLength`` 30 and ``maxLength`` 30 -> ``^[a-z]{30,30}$``."""
    if min_length > 0:  # an alternative that matches only "" cannot serve a non-empty string
        alternatives = _top_level_alternatives(pattern)
        kept = [a for a in alternatives if a not in ("", "^", "$", "^$")]
        if kept and len(kept) < len(alternatives):
            pattern = "|".join(kept)
    whole = _ONE_ATOM.fullmatch(pattern)
    if whole:
        atom, rep = whole.group(1), whole.group(2)
        lo, hi = {"+": (1, None), "*": (0, None)}.get(rep, (None, None))
        if lo is None:
            m = _COUNTED.fullmatch(rep)
            lo, hi = int(m.group(1)), (int(m.group(3)) if m.group(3) else None) if m.group(2) else int(m.group(1))
        lo = max(lo, min_length)
        top = min(h for h in (hi, max_length) if h is not None) if (hi, max_length) != (None, None) else None
        top = max(lo, min(top, max(lo, atom_cap)) if top is not None else max(lo, atom_cap))
        if hi is None or top <= hi:
            return f"^{atom}{{{lo},{top}}}$"
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i: i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            if pattern[i + 1: i + 2] == "^":
                out.append("^")
                i += 1
            if pattern[i + 1: i + 2] == "]":  # a leading ] is a literal
                out.append("]")
                i += 1
            i += 1
            continue
        rep = None
        if c in "+*" and out and out[-1] not in ("(", "|"):
            rep, end = ((1 if c == "+" else 0), None), i + 1
        elif c == "{":
            m = _COUNTED.match(pattern, i)
            if m:
                lo = int(m.group(1))
                hi = (int(m.group(3)) if m.group(3) else None) if m.group(2) else lo
                if hi is not None and hi <= max(lo, atom_cap):  # bounded enough: left as written
                    out.append(m.group(0))
                    i = m.end()
                    continue
                rep, end = (lo, hi), m.end()
        if rep is None:
            out.append(c)
            i += 1
            continue
        lo, hi = rep
        top = max(lo, cap) if hi is None else min(hi, max(lo, cap))
        out.append(f"{{{lo},{top}}}")
        i = end + (pattern[end: end + 1] == "?")  # a lazy repetition: the same language
    return "".join(out)


def _top_level_alternatives(pattern: str) -> list[str]:
    """``pattern`` split at its ``|`` outside groups, classes and escapes."""
    parts, start, depth, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            i += 2 if pattern[i + 1: i + 2] == "]" else 1
            continue
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            parts.append(pattern[start:i])
            start = i + 1
        i += 1
    return parts + [pattern[start:]]


def types(node: dict) -> list:
    """The node's ``type`` as a list (``[]`` when it names none)."""
    kinds = node.get("type")
    return [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []


def minimal_schema(schema: Any, max_string: int = 8) -> Any:
    """A copy of ``schema`` whose instances are short. Example: ``{"type": "object", "properties":
    {"a": {"type": "string"}, "b": {"type": "array"}}, "required": ["a"]}`` -> ``{"type": "object",
    "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"],
    "additionalProperties": false}``."""
    if isinstance(schema, list):
        return [minimal_schema(v, max_string) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas"):
            out[k] = {name: minimal_schema(sub, max_string) for name, sub in v.items()} if isinstance(v, dict) else v
        elif k in ("enum", "const", "examples", "default", "required"):
            out[k] = v
        else:
            out[k] = minimal_schema(v, max_string)
    kinds = types(out)
    props = out.get("properties")
    required = out.get("required")
    if isinstance(props, dict) and isinstance(required, list) and not any(
            k in out for k in ("minProperties", "dependentRequired", "dependencies")):
        out["properties"] = {k: v for k, v in props.items() if k in required}
        out.pop("patternProperties", None)
        if out.get("additionalProperties") is not False:
            out["additionalProperties"] = False
    free = not any(k in out for k in ("enum", "const", "pattern", "format"))
    if "string" in kinds and free:
        out["maxLength"] = max(int(out.get("minLength", 0)), min(int(out.get("maxLength", max_string)), max_string))
    if "array" in kinds:
        out["maxItems"] = int(out.get("minItems", 0))
    return out


def one_of_branches(schema: Any, limit: int = 4) -> list[Any]:
    """Copies of ``schema`` with its first ``oneOf`` (depth first) replaced by each of its first
    ``limit`` branches in turn, each merged into the node (:func:`merge_branch`), with the node's
    properties that only the other branches require left out. ``[]`` when there is no ``oneOf``.
    Example: ``{"properties": {"r": .., "w": ..}, "oneOf": [{"required": ["r"]}, {"required": ["w"]}]}``
    -> branch 1: ``{"properties": {"r": ..}, "required": ["r"]}``."""
    path = _first_one_of(schema, ())
    if path is None:
        return []
    node = _at(schema, path)
    branches = node["oneOf"]
    required = [set(b.get("required", [])) if isinstance(b, dict) else set() for b in branches]
    out = []
    for i, branch in enumerate(branches[:limit]):
        variant = copy.deepcopy(schema)
        target = _at(variant, path)
        del target["oneOf"]
        target.update(merge_branch(target, branch))
        # keys only the other branches require are left out of this one's properties: decoded with
        # no additional properties, the answer then cannot satisfy those branches too
        others = set().union(*(r for j, r in enumerate(required) if j != i)) - required[i]
        if others and isinstance(target.get("properties"), dict):
            target["properties"] = {k: v for k, v in target["properties"].items() if k not in others}
        out.append(variant)
    return out


def merge_branch(base: dict, branch: Any) -> dict:
    """``base`` (a node's own keywords) and one ``anyOf``/``oneOf`` branch as one schema: properties
    merged, required keys united, the branch's other keywords over the base's. Grammars decode a
    node with both its own keywords and a combinator unevenly (a branch that names no ``type``
    lets any value through), so the decoding schema carries each branch whole."""
    if not isinstance(branch, dict):
        return dict(base) if branch is True else {"allOf": [base, branch]}
    out = {**base, **branch}
    if isinstance(base.get("properties"), dict) and isinstance(branch.get("properties"), dict):
        out["properties"] = {**base["properties"], **branch["properties"]}
    if isinstance(base.get("required"), list) and isinstance(branch.get("required"), list):
        out["required"] = list(dict.fromkeys(base["required"] + branch["required"]))
    return out


# a node's keywords that constrain its value (beside a combinator they need distributing)
VALUE_KEYWORDS = ("type", "properties", "required", "additionalProperties", "items", "enum", "const")


def distribute(node: dict) -> dict:
    """A node with its own value keywords beside ``oneOf``/``anyOf`` -> ``anyOf`` over the branches
    merged with them (the decoding form; validation keeps the original). Example: ``{"type":
    "object", "properties": P, "oneOf": [{"required": ["a"]}, B]}`` -> ``{"anyOf": [{"type":
    "object", "properties": P, "required": ["a"]}, merge(..., B)]}``."""
    for key in ("oneOf", "anyOf"):
        branches = node.get(key)
        if isinstance(branches, list) and branches and any(k in node for k in VALUE_KEYWORDS):
            base = {k: v for k, v in node.items() if k != key}
            return {"anyOf": [merge_branch(base, b) for b in branches]}
    return node


# keywords two allOf branches may both carry and still merge (the rest must agree or be absent)
_MERGEABLE = ("properties", "required", "type", "title", "description", "$comment", "examples", "default")


def anchor_pointers(root: Any) -> dict[str, str]:
    """``"#name"`` -> the JSON pointer (``"#/definitions/x"``) of the subschema that names itself so
    (draft-04 ``"id": "#name"``, ``"$id": "#name"``, ``"$anchor": "name"``). Grammar engines
    resolve JSON pointers only."""
    found: dict[str, str] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key in ("id", "$id"):
                if isinstance(node.get(key), str) and node[key].startswith("#") and len(node[key]) > 1:
                    found.setdefault(node[key], "#" + path)
            if isinstance(node.get("$anchor"), str):
                found.setdefault("#" + node["$anchor"], "#" + path)
            for k, v in node.items():
                if k not in ("enum", "const", "examples", "default"):
                    walk(v, f"{path}/{k.replace('~', '~0').replace('/', '~1')}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}/{i}")

    walk(root, "")
    return found


def decoding_form(node: dict, root: Any, anchors: dict[str, str]) -> dict:
    """One schema node rewritten into what grammar engines decode faithfully, every instance of the
    result an instance of ``node`` as far as the grammar enforces it (answers are validated
    against the original):

    * a ``oneOf``/``anyOf`` beside the node's own keywords distributed into its branches
      (:func:`distribute`), an ``allOf`` merged into one schema (:func:`merge_all_of`);
    * a ``$ref`` to an anchor (``"#name"``) made a JSON pointer (:func:`anchor_pointers`);
    * ``if``/``then``/``else``, which no grammar expresses: the keys either branch requires are
      required (an object holding them all satisfies whichever branch applies);
    * ``"multipleOf": 0.01`` (any divisor of 1) on a number: decoded as an integer (a multiple)."""
    node = merge_all_of(distribute(node), root, anchors)
    if isinstance(node.get("$ref"), str) and node["$ref"] in anchors:
        node = {**node, "$ref": anchors[node["$ref"]]}
    if "if" in node and ("then" in node or "else" in node):
        extra = [k for b in ("then", "else") if isinstance(node.get(b), dict)
                 for k in node[b].get("required", []) if isinstance(node[b].get("required"), list)]
        if extra:
            base = node.get("required") if isinstance(node.get("required"), list) else []
            node = {**node, "required": list(dict.fromkeys(base + extra))}
    step, kinds = node.get("multipleOf"), types(node)
    if isinstance(step, (int, float)) and not isinstance(step, bool) and 0 < step <= 1 and "number" in kinds:
        if abs(1 / step - round(1 / step)) < 1e-9:
            node = {**node, "type": "integer" if isinstance(node["type"], str) else
                    list(dict.fromkeys("integer" if t == "number" else t for t in kinds))}
    return node


def json_pointer(doc: Any, ref: str) -> Any:
    """The node a local JSON pointer (``"#"`` or ``"#/a/b~1c"``) names in ``doc``; LookupError when
    it names none."""
    node = doc
    for raw in ref[2:].split("/") if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise LookupError(f"{ref!r} names nothing")
    return node


def _local_ref(root: Any, ref: str, anchors: dict[str, str] | None = None) -> Any:
    """The node a local JSON pointer (``#/definitions/x``) or anchor (``#name``) names in ``root``;
    None when it names none."""
    ref = (anchors or {}).get(ref, ref)
    if ref != "#" and not ref.startswith("#/"):
        return None
    try:
        return json_pointer(root, ref)
    except LookupError:
        return None


def _holds(node: Any, key: str) -> bool:
    """Whether any schema object in ``node`` has ``key``."""
    if isinstance(node, dict):
        return key in node or any(_holds(v, key) for v in node.values())
    return isinstance(node, list) and any(_holds(v, key) for v in node)


def merge_all_of(node: dict, root: Any, anchors: dict[str, str] | None = None) -> dict:
    """A node whose ``allOf`` branches (a local ``$ref`` resolved one level) merge without conflict
    -> one schema: properties united (a property in two branches takes both: ``allOf`` of the two),
    required keys united, types intersected. Grammars decode ``allOf`` poorly (xgrammar lets any
    value through), so the decoding schema carries the conjunction written out. Left as it is when
    two branches set another keyword differently, or a branch is not a schema object.

    Example: ``{"allOf": [{"$ref": "#/definitions/pets"}, {"properties": {"horse": S}, "required":
    ["horse"]}]}`` with pets ``{"type": "object", "properties": {"cat": S}, "required": ["cat"]}``
    -> ``{"type": "object", "properties": {"cat": S, "horse": S}, "required": ["cat", "horse"]}``."""
    branches = node.get("allOf")
    if not isinstance(branches, list) or not branches:
        return node
    out = {k: v for k, v in node.items() if k != "allOf"}
    for branch in branches:
        if isinstance(branch, dict) and set(branch) == {"$ref"} and isinstance(branch["$ref"], str):
            branch = _local_ref(root, branch["$ref"], anchors)
            if _holds(branch, "allOf"):  # written out, it could hold this allOf again (a recursive $ref)
                return node
        if not isinstance(branch, dict) or "allOf" in branch or "$ref" in branch:
            return node
        for k, v in branch.items():
            if k == "properties" and isinstance(v, dict) and isinstance(out.get(k, {}), dict):
                props = dict(out.get(k, {}))
                for name, sub in v.items():
                    props[name] = sub if name not in props or props[name] == sub else {"allOf": [props[name], sub]}
                out[k] = props
            elif k == "required" and isinstance(v, list) and isinstance(out.get(k, []), list):
                out[k] = list(dict.fromkeys(out.get(k, []) + v))
            elif k == "type" and k in out:
                a, b = types(out), types(branch)
                both = [t for t in a if t in b or (t == "integer" and "number" in b)] + \
                    [t for t in b if t == "integer" and "number" in a and t not in a]
                if not both:
                    return node
                out[k] = both[0] if len(both) == 1 else both
            elif k not in out:
                out[k] = v
            elif out[k] != v and k not in _MERGEABLE:
                return node
    return out


def _first_one_of(node: Any, path: tuple) -> tuple | None:
    if isinstance(node, dict):
        if isinstance(node.get("oneOf"), list) and node["oneOf"]:
            return path
        for k, v in node.items():
            if k in ("enum", "const", "examples", "default", "required"):
                continue
            found = _first_one_of(v, (*path, k))
            if found is not None:
                return found
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found = _first_one_of(v, (*path, i))
            if found is not None:
                return found
    return None


def _at(node: Any, path: tuple) -> Any:
    for k in path:
        node = node[k]
    return node
