"""The llguidance backend of :class:`models.grammar.GrammarEngine` (the Guidance project's engine):
the second engine, for the schemas xgrammar refuses. ``lenient``: keywords it does not implement
(``dependencies``, ``not``, unknown formats) are left to the validator instead of refusing the
schema. A compiled grammar is a matcher template; each matcher is a copy of it."""

from __future__ import annotations

import json
from typing import Any

import torch

from .constraints import ConstraintKind
from .grammar import CompiledCache, GrammarError, tighten_schema, unpack_bitmask

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":", "lenient": True}


class LLGuidanceBackend:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, cache_size: int = 256):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_id)
        self.cache = CompiledCache(cache_size)  # grammar text -> template matcher

    def _grammar(self, kind: str, spec: Any) -> str:
        m = self.ll.LLMatcher
        if kind == ConstraintKind.JSON_SCHEMA:
            return m.grammar_from_json_schema(json.dumps(tighten_schema(spec)), defaults=JSON_OPTIONS)
        if kind == ConstraintKind.JSON_OBJECT:
            return m.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if kind == ConstraintKind.REGEX:
            return m.grammar_from_regex(spec)
        raise GrammarError(f"no grammar for constraint kind {kind!r}")

    def compile(self, kind: str, spec: Any):
        grammar = self._grammar(kind, spec)
        template = self.cache.get(grammar)
        if template is not None:
            return template
        template = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        self.cache.put(grammar, template)
        return template

    def matcher(self, compiled) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self, compiled.deep_copy())


class LLGuidanceMatcher:
    """:class:`models.grammar.Matcher` over an llguidance ``LLMatcher``. llguidance's matcher
    enters a permanent error state on a token it rejects, so a token is checked before it is
    consumed; it stops as soon as the grammar is complete, so "terminated" is tracked as xgrammar
    means it: ``<eos>`` accepted."""

    def __init__(self, backend: LLGuidanceBackend, native, terminated: bool = False):
        self.backend = backend
        self.native = native
        self.terminated = terminated

    def accept_token(self, token: int) -> bool:
        token = int(token)
        if self.terminated:
            return False
        if token == self.backend.eos_id and self.native.is_stopped():  # complete: <eos> ends it
            self.terminated = True
            return True
        if self.native.validate_tokens([token]) != 1:
            return False
        ok = self.native.consume_token(token)
        self.terminated = ok and token == self.backend.eos_id
        return ok

    def allowed(self) -> torch.Tensor:
        if self.terminated:
            return torch.zeros(self.backend.vocab_size, dtype=torch.bool)
        bits = torch.frombuffer(bytearray(self.native.compute_bitmask()), dtype=torch.int32)
        return unpack_bitmask(bits.unsqueeze(0), self.backend.vocab_size)[0]

    def is_terminated(self) -> bool:
        return self.terminated

    def fork(self) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self.backend, self.native.deep_copy(), self.terminated)

    def forced_bytes(self, max_bytes: int) -> bytes:
        return b"" if self.terminated else bytes(self.native.compute_ff_bytes()[:max_bytes])
