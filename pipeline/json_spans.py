"""Character spans of the values in a JSON text, by JSON path.

``value_spans('{"a":[1,{"b":true}]}')`` gives ``{(): (0, 20), ("a",): (5, 19), ("a", 0): (6, 7),
("a", 1): (8, 18), ("a", 1, "b"): (13, 17)}``: ``text[start:end]`` is the value's source text. A
validation error's path (jsonschema's ``error.path``) then points at the part of a draft to renoise
or repair. Text that is not JSON yields the spans parsed before the failure.
"""

from __future__ import annotations

import json

_DECODER = json.JSONDecoder()
_WS = " \t\n\r"


def value_spans(text: str) -> dict[tuple, tuple[int, int]]:
    spans: dict[tuple, tuple[int, int]] = {}
    try:
        _value(text, _skip(text, 0), (), spans)
    except (ValueError, IndexError):
        pass
    return spans


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _value(text: str, i: int, path: tuple, spans: dict) -> int:
    c = text[i]
    if c == "{":
        end = _object(text, i, path, spans)
    elif c == "[":
        end = _array(text, i, path, spans)
    else:
        _, end = _DECODER.raw_decode(text, i)
    spans[path] = (i, end)
    return end


def _object(text: str, i: int, path: tuple, spans: dict) -> int:
    i = _skip(text, i + 1)
    if text[i] == "}":
        return i + 1
    while True:
        key, i = _DECODER.raw_decode(text, i)
        if not isinstance(key, str):
            raise ValueError("object key must be a string")
        i = _skip(text, i)
        if text[i] != ":":
            raise ValueError("expected ':'")
        i = _value(text, _skip(text, i + 1), path + (key,), spans)
        i = _skip(text, i)
        if text[i] == "}":
            return i + 1
        if text[i] != ",":
            raise ValueError("expected ',' or '}'")
        i = _skip(text, i + 1)


def _array(text: str, i: int, path: tuple, spans: dict) -> int:
    i = _skip(text, i + 1)
    if text[i] == "]":
        return i + 1
    k = 0
    while True:
        i = _skip(text, _value(text, i, path + (k,), spans))
        k += 1
        if text[i] == "]":
            return i + 1
        if text[i] != ",":
            raise ValueError("expected ',' or ']'")
        i = _skip(text, i + 1)


def char_to_token_span(offsets: list[tuple[int, int]], span: tuple[int, int]) -> tuple[int, int]:
    """Token index range [first, last + 1) covering the character ``span``, given each token's
    character offsets (as a fast tokenizer's ``offset_mapping`` reports them)."""
    start, end = span
    hit = [k for k, (a, b) in enumerate(offsets) if a < end and b > start]
    return (hit[0], hit[-1] + 1) if hit else (len(offsets), len(offsets))
