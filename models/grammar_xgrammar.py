"""The xgrammar backend of :class:`models.grammar.GrammarEngine` (vLLM's default structured-output
engine): compiled grammars cached by xgrammar's compiler per schema text, and, with a
``cache_dir``, on disk (:class:`GrammarDiskCache`), so that a restarted replica, or another on the
same node, loads a grammar instead of compiling it again."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .constraints import ConstraintKind
from .grammar import CompiledCache, GrammarError, tighten_schema, unpack_bitmask


class XGrammarBackend:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, cache_dir: str | None = None):
        import xgrammar as xgr

        self.xgr = xgr
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[eos_id])
        # first byte of each token's text (-1: none, e.g. a special token): what forced_bytes reads
        special = set(self.info.special_token_ids)
        first = [v[0] if v and i not in special else -1 for i, v in enumerate(self.info.decoded_vocab)]
        self.first_byte = np.full(vocab_size, -1, dtype=np.int16)
        self.first_byte[: len(first)] = first[:vocab_size]
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_limit_bytes=64 << 20)
        self.disk = GrammarDiskCache(Path(cache_dir), _fingerprint(tokenizer, vocab_size, eos_id)) if cache_dir else None
        self.loaded = CompiledCache()  # with a disk cache: what this process holds

    def compile(self, kind: str, spec: Any):
        if kind == ConstraintKind.JSON_SCHEMA:
            source = json.dumps(tighten_schema(spec))  # key order kept: it is the order properties are written in
            build = lambda: self.compiler.compile_json_schema(source, any_whitespace=False, strict_mode=True,  # noqa: E731
                                                              separators=(",", ":"))
        elif kind == ConstraintKind.JSON_OBJECT:
            source = '{"type": "object"}'
            build = lambda: self.compiler.compile_json_schema(source, any_whitespace=False, strict_mode=False,  # noqa: E731
                                                              separators=(",", ":"))
        elif kind == ConstraintKind.REGEX:
            source = spec
            build = lambda: self.compiler.compile_regex(spec)  # noqa: E731
        else:
            raise GrammarError(f"no grammar for constraint kind {kind!r}")
        if self.disk is None:
            return build()  # xgrammar's compiler caches it in memory
        key = (kind, source)
        compiled = self.loaded.get(key)
        if compiled is not None:
            return compiled
        stored = self.disk.load(kind, source)
        if stored is not None:
            try:
                compiled = self.xgr.CompiledGrammar.deserialize_json(stored, self.info)
            except Exception:  # written by another xgrammar, or damaged: compile again
                self.disk.drop(kind, source)
        if compiled is None:
            compiled = build()
            self.disk.store(kind, source, compiled.serialize_json())
        self.loaded.put(key, compiled)
        return compiled

    def matcher(self, compiled) -> "XGrammarMatcher":
        return XGrammarMatcher(self, self.xgr.GrammarMatcher(compiled))


class XGrammarMatcher:
    """:class:`models.grammar.Matcher` over an xgrammar ``GrammarMatcher``."""

    def __init__(self, backend: XGrammarBackend, native):
        self.backend = backend
        self.native = native
        self._bitmask = None  # xgrammar's int32 [1, ceil(V / 32)], filled per call
        # what allowed() returned, until the matcher moves: a decoding step asks twice in one
        # state (the jump-forward probe after a token, the next token's mask)
        self._allowed: torch.Tensor | None = None

    def allowed(self) -> torch.Tensor:
        if self._allowed is None:
            if self._bitmask is None:
                self._bitmask = self.backend.xgr.allocate_token_bitmask(1, self.backend.vocab_size)
            self.native.fill_next_token_bitmask(self._bitmask)
            self._allowed = unpack_bitmask(self._bitmask, self.backend.vocab_size)[0]  # unpacking copies
        return self._allowed

    def accept_token(self, token: int) -> bool:
        ok = self.native.accept_token(int(token))
        if ok:
            self._allowed = None
        return ok

    def accept_bytes(self, data: bytes) -> bool:
        """Advance over ``data`` (text, not a token); False (and no change) when the grammar rejects it."""
        ok = self.native.accept_string(data)
        if ok:
            self._allowed = None
        return ok

    def is_terminated(self) -> bool:
        return self.native.is_terminated()

    def fork(self) -> "XGrammarMatcher":
        return XGrammarMatcher(self.backend, self.native.fork())

    def forced_bytes(self, max_bytes: int) -> bytes:
        """Byte by byte, while every token the grammar allows starts with the same byte and it may
        not end here. Like xgrammar's ``find_jump_forward_string``, but bounded: that one never
        returns for a grammar whose forced text is infinite (a schema where every object must hold
        another)."""
        out = bytearray()
        probe = self  # this matcher (its mask is the next token's too) until a byte is forced, then a fork
        while len(out) < max_bytes and not probe.native.is_terminated():
            allowed = probe.allowed().numpy()
            if allowed[self.backend.eos_id]:
                break
            firsts = self.backend.first_byte[allowed]
            lead = int(firsts[0]) if len(firsts) else -1
            if lead < 0 or (firsts != lead).any():
                break
            if probe is self:
                probe = self.fork()
            if not probe.accept_bytes(bytes([lead])):
                break
            out.append(lead)
        return bytes(out)


def _fingerprint(tokenizer, vocab_size: int, eos_id: int) -> str:
    """What a compiled grammar depends on besides its constraint: xgrammar's version and the
    vocabulary it masks."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps([version("xgrammar"), vocab_size, eos_id, vocab], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class GrammarDiskCache:
    """Compiled grammars as files under ``root/<fingerprint>/``, one per constraint (named by a hash
    of its kind and text), written atomically, so replicas sharing a node and a replica's next life
    load them. At most ``max_files`` are kept: past that, the oldest go."""

    def __init__(self, root: Path, fingerprint: str, max_files: int = 4096):
        self.dir = root / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_files = max_files
        self.hits = self.stores = 0

    def _path(self, kind: str, source: str) -> Path:
        return self.dir / (hashlib.sha256(f"{kind}\0{source}".encode()).hexdigest() + ".json")

    def load(self, kind: str, source: str) -> str | None:
        try:
            text = self._path(kind, source).read_text()
        except OSError:
            return None
        self.hits += 1
        return text

    def drop(self, kind: str, source: str) -> None:
        self._path(kind, source).unlink(missing_ok=True)

    def store(self, kind: str, source: str, text: str) -> None:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self._path(kind, source))
        except OSError:  # a full or read-only disk costs the cache, never the request
            return
        self.stores += 1
        if self.stores % 64 == 0:
            self.prune()

    def prune(self) -> None:
        files = sorted(self.dir.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in files[: max(0, len(files) - self.max_files)]:
            p.unlink(missing_ok=True)
