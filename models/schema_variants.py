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
from typing import Any

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
