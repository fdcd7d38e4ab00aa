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

COMBINATORS = ("anyOf", "oneOf", "allOf")


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
    kinds = out.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds if isinstance(kinds, list) else []
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
        out["maxItems"] = max(int(out.get("minItems", 0)), 0)
    return out


def one_of_branches(schema: Any, limit: int = 4) -> list[Any]:
    """Copies of ``schema`` with its first ``oneOf`` (depth first) replaced by each of its first
    ``limit`` branches in turn: ``{..., "oneOf": [A, B]}`` -> ``[{..., "allOf": [A]}, {..., "allOf": [B]}]``
    (``allOf`` keeps the node's own keywords beside the branch). ``[]`` when there is no ``oneOf``."""
    path = _first_one_of(schema, ())
    if path is None:
        return []
    node = _at(schema, path)
    out = []
    for branch in node["oneOf"][:limit]:
        variant = copy.deepcopy(schema)
        target = _at(variant, path)
        del target["oneOf"]
        target["allOf"] = [*target.get("allOf", []), copy.deepcopy(branch)]
        out.append(variant)
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
