"""Constraint decoding by kind: the grammar engine (``models/grammar.py``) for the grammar kinds,
the Sudoku masks (``models/sudoku_decoding.py``) for ``sudoku``. The pipeline's drafter and AR
roles hold one of these and ask it, per request, for a canvas hook, an AR processor or the longest
valid prefix of a draft; a kind no part supports decodes freely and validation alone decides."""

from __future__ import annotations

from typing import Any, Sequence


class ConstraintDecoding:
    """``grammar``: a :class:`models.grammar.GrammarEngine` (or None); ``others``: further parts
    with the same four methods (e.g. :class:`models.sudoku_decoding.SudokuDecoding`)."""

    def __init__(self, grammar=None, *others):
        self.grammar = grammar
        self.parts = [p for p in (grammar, *others) if p is not None]

    def _part(self, kind: str):
        return next((p for p in self.parts if p.supports(kind)), None)

    def supports(self, kind: str) -> bool:
        return self._part(kind) is not None

    def canvas_hook(self, kind: str, spec: Any, canvas_length: int):
        return self._part(kind).canvas_hook(kind, spec, canvas_length)

    def processor(self, kind: str, spec: Any, prefix: Sequence[int] = ()):
        return self._part(kind).processor(kind, spec, prefix)

    def longest_prefix(self, kind: str, spec: Any, ids: Sequence[int]) -> int:
        return self._part(kind).longest_prefix(kind, spec, ids)
