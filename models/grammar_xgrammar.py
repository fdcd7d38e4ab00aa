"""The xgrammar backend of :class:`models.grammar.GrammarEngine` (vLLM's default structured-output
engine): compiled grammars cached by xgrammar's compiler per schema text."""

from __future__ import annotations

import json
from typing import Any

import torch

from .constraints import ConstraintKind
from .grammar import GrammarError, tighten_schema, unpack_bitmask


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_id: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_id])
        # first byte of each token's text (-1: none, e.g. a special token): what forced_bytes reads
        special = set(self.info.special_token_ids)
        first = [v[0] if v and i not in special else -1 for i, v in enumerate(self.info.decoded_vocab)]
        self.first_byte = torch.full((vocab_size,), -1, dtype=torch.int16)
        self.first_byte[: len(first)] = torch.tensor(first[:vocab_size], dtype=torch.int16)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_limit_bytes=64 << 20)

    def compile(self, kind: str, spec: Any):
        if kind == ConstraintKind.JSON_SCHEMA:
            return self.compiler.compile_json_schema(json.dumps(tighten_schema(spec)), any_whitespace=False,
                                                     strict_mode=True, separators=(",", ":"))
        if kind == ConstraintKind.JSON_OBJECT:
            return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False,
                                                     separators=(",", ":"))
        if kind == ConstraintKind.REGEX:
            return self.compiler.compile_regex(spec)
        raise GrammarError(f"no grammar for constraint kind {kind!r}")

    def matcher(self, compiled) -> "XGrammarMatcher":
        return XGrammarMatcher(self, self.xgr.GrammarMatcher(compiled))


class XGrammarMatcher:
    """:class:`models.grammar.Matcher` over an xgrammar ``GrammarMatcher``."""

    def __init__(self, backend: XGrammarBackend, native):
        self.backend = backend
        self.native = native

    def accept_token(self, token: int) -> bool:
        return self.native.accept_token(int(token))

    def allowed(self) -> torch.Tensor:
        bitmask = self.backend.xgr.allocate_token_bitmask(1, self.backend.vocab_size)
        self.native.fill_next_token_bitmask(bitmask)
        return unpack_bitmask(bitmask, self.backend.vocab_size)[0]

    def is_terminated(self) -> bool:
        return self.native.is_terminated()

    def fork(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self.backend, self.native.fork())

    def forced_bytes(self, max_bytes: int) -> bytes:
        """Byte by byte, while every token the grammar allows starts with the same byte and it may
        not end here. Like xgrammar's ``find_jump_forward_string``, but bounded: that one never
        returns for a grammar whose forced text is infinite (a schema where every object must hold
        another)."""
        m = self.native.fork()
        out = bytearray()
        probe = XGrammarMatcher(self.backend, m)
        while len(out) < max_bytes and not m.is_terminated():
            allowed = probe.allowed()
            if allowed[self.backend.eos_id]:
                break
            firsts = self.backend.first_byte[allowed]
            lead = int(firsts[0]) if len(firsts) else -1
            if lead < 0 or bool((firsts != lead).any()) or not m.accept_string(bytes([lead])):
                break
            out.append(lead)
        return bytes(out)
