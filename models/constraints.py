"""The closed set of constraint kinds dgserve knows (a custom validator registers any other name).

A ``str`` enum: a kind compares equal to its wire name (``response_format.type``), so the names a
client sends, the validators' registry and the grammar engines all use these members."""

from __future__ import annotations

from enum import Enum
from typing import Literal


class ConstraintKind(str, Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    SUDOKU = "sudoku"

    def __str__(self) -> str:
        return self.value


# what a grammar engine compiles (in the denoising loop and for AR; vLLM's structured
# outputs); the others are enforced by validation alone
GRAMMAR_KINDS = frozenset({ConstraintKind.JSON_SCHEMA, ConstraintKind.JSON_OBJECT, ConstraintKind.REGEX})

# the grammar backends (models/grammar_*.py), in the order a constraint is offered to them by default
GrammarEngineName = Literal["xgrammar", "llguidance"]
GRAMMAR_ENGINES: tuple[GrammarEngineName, ...] = ("xgrammar", "llguidance")
