"""Grammar-constrained decoding: xgrammar (vLLM's default structured-output engine) and
llguidance behind one :class:`GrammarEngine`.

* :meth:`GrammarEngine.processor`: a logits processor for AR decoding; its output is valid by
  construction (up to the token budget) for every JSON Schema / regex the engine compiles;
* :meth:`GrammarEngine.longest_prefix`: how many tokens of a draft the grammar still accepts
  (the repair rule: AR continues under the grammar from there);
* :class:`GrammarCanvasHook`: the grammar inside the denoising loop. Pins: the string the grammar
  forces at the canvas start (:meth:`GrammarEngine.forced_text`, e.g. ``{"name":"`` when ``name``
  is the first required key; bounded by the canvas). Mask: each step, the canvas argmax is walked
  left to right through the grammar; at the first position the grammar rejects, the logits are masked to what the grammar
  allows there (so that position is re-drawn, not accepted), and after an accepted ``<eos>`` every
  later position is masked to padding. Positions beyond the first violation stay free; the next
  step walks again.

JSON is compact (``,`` and ``:`` with no whitespace), as the checkpoint writes it, and free
strings and arrays are bounded (:func:`tighten_schema`). Compiled grammars are cached per
constraint by each backend; a compile that exceeds ``compile_timeout_s`` is refused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, Sequence

import torch

from .constraints import GRAMMAR_ENGINES, GRAMMAR_KINDS, ConstraintKind
from .schema_variants import anchor_pointers, bounded_pattern, decoding_form, types

UNBOUNDED_FORMATS = frozenset({"email", "idn-email", "hostname", "idn-hostname", "uri", "uri-reference", "iri",
                               "iri-reference", "uri-template", "json-pointer", "relative-json-pointer", "regex"})


def tighten_schema(schema: Any, max_string: int = 32, max_items: int = 4, root: Any = None,
                   anchors: dict[str, str] | None = None) -> Any:
    """A copy of ``schema`` for decoding: every instance of it is an instance of the original
    (against which answers are validated), and what grammar engines would drop is written out.

    * Bounds: free strings and arrays get a ``maxLength``/``maxItems`` (never below their
      minimum), so a small model cannot write one value until the token budget runs out; a
      string's ``pattern`` is itself bounded (:func:`models.schema_variants.bounded_pattern`:
      grammars ignore a ``maxLength`` beside it).
    * Each node in its decoding form (:func:`models.schema_variants.decoding_form`: combinators
      distributed or merged, anchors made pointers, conditional requirements required,
      ``multipleOf`` divisors of 1 as integers); a required key the node does not list is listed
      (grammars allow no other keys); a ``false`` property left out.
    """
    if root is None:
        root, anchors = schema, anchor_pointers(schema)
    if isinstance(schema, list):
        return [tighten_schema(v, max_string, max_items, root, anchors) for v in schema]
    if not isinstance(schema, dict):
        return schema
    schema = decoding_form(schema, root, anchors)
    out = {k: tighten_schema(v, max_string, max_items, root, anchors) for k, v in schema.items()}
    props = out.get("properties")
    if isinstance(props, dict) and any(v is False for v in props.values()):
        # a property whose schema is `false` must be absent; with no additional properties
        # allowed during decoding, leaving it out says the same (xgrammar refuses `false`)
        out["properties"] = {k: v for k, v in props.items() if v is not False}
    kinds = types(out)
    required, props = out.get("required"), out.get("properties")
    if (isinstance(required, list) and (isinstance(props, dict) or "object" in kinds)
            and out.get("additionalProperties") is not False and not out.get("patternProperties")):
        # a required key the node does not list: grammars decode with no additional properties,
        # so it could never be written; it is listed with the node's additionalProperties schema,
        # or as a short scalar (an instance of any schema `{}`)
        props = props if isinstance(props, dict) else {}
        extra = out.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {"type": ["string", "number", "boolean", "null"],
                                                       "maxLength": max_string}
        missing = {k: extra for k in required if isinstance(k, str) and k not in props}
        if missing:
            out["properties"] = {**props, **missing}
    if isinstance(out.get("format"), str) and out["format"] in UNBOUNDED_FORMATS:
        # xgrammar's grammars for these formats ignore maxLength; jsonschema does not assert
        # formats by default, so the bounded plain string validates the same
        del out["format"]
    if isinstance(out.get("pattern"), str):
        # grammars ignore maxLength beside a pattern: the pattern itself is bounded
        out["pattern"] = bounded_pattern(out["pattern"], int(out.get("minLength", 0)), out.get("maxLength"),
                                         atom_cap=max_string)
    free_string = not any(k in out for k in ("enum", "const", "maxLength", "format", "pattern"))
    if "string" in kinds and free_string:
        out["maxLength"] = max(int(out.get("minLength", 0)), max_string)
    if "array" in kinds and "maxItems" not in out:
        out["maxItems"] = max(int(out.get("minItems", 0)), max_items)
    return out


class CompiledCache:
    """Compiled grammars by key, the ``size`` most recently used kept; safe across threads (each
    compile runs in a thread of its own, :meth:`GrammarEngine.compile`)."""

    def __init__(self, size: int = 256):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> Any:
        """The value under ``key`` (now the most recent), or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key, value) -> None:
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)


class GrammarError(ValueError):
    """The constraint cannot be compiled (a feature the engine does not support)."""


class GrammarTimeout(GrammarError):
    """Compilation ran past the time cap (a hostile or pathological constraint)."""


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's int32 bitmask [n, ceil(V/32)] -> bool [n, V] (CPU; called per token, so one
    numpy call rather than four tensor ops). The words are little-endian: bit i of word w is token
    32 w + i."""
    import numpy as np

    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size].view(bool))


class Matcher(Protocol):
    """A grammar's state after the tokens it accepted; one per request (or canvas walk)."""

    def accept_token(self, token: int) -> bool:
        """Advance over ``token``; False (and no change) when the grammar rejects it."""
        ...

    def allowed(self) -> torch.Tensor:
        """Bool [vocab] of the tokens the grammar accepts next (read it, do not write into it: a
        matcher may return the same tensor until it moves)."""
        ...

    def is_terminated(self) -> bool:
        """``<eos>`` was accepted."""
        ...

    def fork(self) -> "Matcher": ...

    def forced_bytes(self, max_bytes: int) -> bytes:
        """The bytes the grammar forces next (at most ``max_bytes``); the matcher is not advanced."""
        ...


class GrammarEngine:
    """Grammars over one vocabulary from one or more backends (``engines``, in order:
    ``models/grammar_xgrammar.py``, ``models/grammar_llguidance.py``): a constraint is compiled by
    the first backend that accepts it, so a schema one engine refuses can still be decoded under
    the other's grammar. A compile past ``compile_timeout_s`` is refused outright."""

    def __init__(self, tokenizer, vocab_size: int, eos_id: int, pad_id: int = 0,
                 compile_timeout_s: float = 2.0, max_digit_run: int = 9, engines: Sequence[str] = GRAMMAR_ENGINES,
                 jump_forward: bool = True, max_jump_bytes: int = 256, cache_dir: str | None = None):
        from .grammar_llguidance import LLGuidanceBackend
        from .grammar_xgrammar import XGrammarBackend

        if not engines or any(e not in GRAMMAR_ENGINES for e in engines):
            raise ValueError(f"grammar engines must be a non-empty list of {GRAMMAR_ENGINES}, not {list(engines)}")
        # cache_dir: compiled grammars kept on disk across the process's life (xgrammar's serialise)
        kinds = {"xgrammar": partial(XGrammarBackend, cache_dir=cache_dir), "llguidance": LLGuidanceBackend}
        self.backends: list[Any] = [kinds[engines[0]](tokenizer, vocab_size, eos_id)]
        # the later engines are built when a constraint first reaches them (most never do)
        self._later = [partial(kinds[e], tokenizer, vocab_size, eos_id) for e in engines[1:]]
        self._lock = threading.Lock()
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.compile_timeout_s = compile_timeout_s
        pieces = [tokenizer.decode([i]) for i in range(min(vocab_size, len(tokenizer)))]
        self.digits_only = torch.zeros(vocab_size, dtype=torch.bool)  # tokens made of digits alone
        self.digits_only[: len(pieces)] = torch.tensor([p.isdigit() and p.isascii() for p in pieces])
        self._pieces = pieces  # each token's text: what the processors' guards read
        self.max_digit_run = max_digit_run
        # special tokens other than <eos> are never part of an answer: an engine that reads a
        # special token's text (xgrammar takes "<pad>" for five characters of a string) must not
        # offer it, since decoding drops it from the text the validator sees
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[[i for i in getattr(tokenizer, "all_special_ids", []) if i != eos_id and i < vocab_size]] = True
        self.jump_forward = jump_forward  # AR processors append the text the grammar forces (GrammarProcessor.jump)
        self.max_jump_bytes = max_jump_bytes
        # a fast tokenizer's own encoder: what its __call__ returns for one text, at a fifth of the cost
        self._encoder = getattr(tokenizer, "backend_tokenizer", None)

    def encode(self, text: str) -> list[int]:
        """``text``'s token ids as the tokenizer writes it (no special tokens added)."""
        if self._encoder is not None:
            return self._encoder.encode(text, add_special_tokens=False).ids
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def piece(self, token: int) -> str:
        """The text of one token alone."""
        return self._pieces[token] if 0 <= token < len(self._pieces) else self.tokenizer.decode([token])

    @staticmethod
    def supports(kind: str) -> bool:
        return kind in GRAMMAR_KINDS

    def _backend(self, i: int):
        with self._lock:
            while len(self.backends) <= i:
                self.backends.append(self._later[len(self.backends) - 1]())
            return self.backends[i]

    def _compile_now(self, kind: str, spec: Any) -> "Compiled":
        refusals = []
        for i in range(1 + len(self._later)):
            backend = self._backend(i)
            try:
                return Compiled(backend, backend.compile(kind, spec))
            except Exception as e:  # each engine raises its own types on unsupported input
                refusals.append(f"{backend.name}: {e}")
        raise GrammarError("; ".join(refusals))

    def compile(self, kind: str, spec: Any) -> "Compiled":
        """Compile (cached) or raise :class:`GrammarError` within ``compile_timeout_s``."""
        if kind not in GRAMMAR_KINDS:
            raise GrammarError(f"no grammar for constraint kind {kind!r}")
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["grammar"] = self._compile_now(kind, spec)
            except Exception as e:
                box["error"] = e

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(self.compile_timeout_s)
        if worker.is_alive():
            raise GrammarTimeout(f"grammar compilation exceeded {self.compile_timeout_s:g} s")
        if "error" in box:
            raise GrammarError(f"cannot compile a grammar for this {kind}: {box['error']}")
        return box["grammar"]

    def matcher(self, kind: str, spec: Any, prefix: Sequence[int] = ()) -> Matcher:
        """A matcher advanced over ``prefix`` (raises ValueError if the grammar rejects it)."""
        m = self.compile(kind, spec).matcher()
        for t in prefix:
            if not m.accept_token(int(t)):
                raise ValueError("prefix is not accepted by the grammar")
        return m

    def allowed(self, m: Matcher) -> torch.Tensor:
        """Bool [vocab] of the tokens the matcher accepts next (special tokens but ``<eos>`` never)."""
        return m.allowed() & ~self.special

    def forced_text(self, matcher: Matcher, max_bytes: int) -> str:
        """The text the grammar forces next from ``matcher``'s state (it is not advanced), at most
        ``max_bytes`` long, cut before a partial UTF-8 character. Example: ``{"name": string,
        "age": int}``, both required -> ``{"name":"``."""
        out = matcher.forced_bytes(max_bytes)
        for end in range(len(out), max(-1, len(out) - 4), -1):  # no partial UTF-8 character at the end
            try:
                return out[:end].decode("utf-8")
            except UnicodeDecodeError:
                continue
        return ""

    def longest_prefix(self, kind: str, spec: Any, ids: Sequence[int]) -> int:
        m = self.compile(kind, spec).matcher()
        for i, t in enumerate(ids):
            if not m.accept_token(int(t)):
                return i
        return len(ids)

    def processor(self, kind: str, spec: Any, prefix: Sequence[int] = ()) -> "GrammarProcessor":
        return GrammarProcessor(self, self.matcher(kind, spec, prefix))

    def canvas_hook(self, kind: str, spec: Any, canvas_length: int) -> "GrammarCanvasHook":
        return GrammarCanvasHook(self, self.compile(kind, spec), canvas_length)


@dataclass(frozen=True)
class Compiled:
    """A constraint compiled by one backend; ``matcher()`` starts a fresh matcher over it."""

    backend: Any
    native: Any

    @property
    def engine(self) -> str:
        return self.backend.name

    def matcher(self) -> Matcher:
        return self.backend.matcher(self.native)


class GrammarProcessor:
    """AR logits processor: feeds the tokens generated so far to the matcher, then masks the
    next-token logits to what the grammar allows (only ``<eos>`` once the grammar is complete).

    Two guards keep a weak model from spending the whole budget inside one value: after
    ``max_digit_run`` consecutive digits the digit-only tokens are masked (JSON numbers are
    unbounded), and no token may repeat more than ``max_repeat`` times in a row. Each guard yields
    when it would leave nothing the grammar allows.
    """

    def __init__(self, engine: GrammarEngine, matcher, max_repeat: int = 4):
        self.engine = engine
        self.matcher = matcher
        self.max_repeat = max_repeat
        self.seen = 0
        self.digit_run = 0
        self.repeat = 0

    def _sync(self, generated: Sequence[int]) -> None:
        """Feed the matcher (and the guards) the tokens generated since the last call."""
        for i in range(self.seen, len(generated)):
            t = int(generated[i])
            self.matcher.accept_token(t)
            piece = self.engine.piece(t)
            tail = len(piece) - len(piece.rstrip("0123456789"))
            self.digit_run = self.digit_run + tail if tail == len(piece) else tail
            self.repeat = self.repeat + 1 if i > 0 and generated[i - 1] == t else 1
        self.seen = len(generated)

    def jump(self, generated: Sequence[int], room: int) -> list[int]:
        """Jump-forward decoding: the tokens of the text the grammar forces after ``generated``
        (e.g. ``","name":"`` between two required keys), at most ``room`` of them, which the
        decoding loop appends without a model choice and feeds in one forward.

        The text is tokenized as the tokenizer writes it, and its last token is left to the
        model, which may merge it with what follows (``":"`` before a value that starts with
        punctuation); every token is checked against the grammar. With the engine's
        ``jump_forward`` off, nothing is forced."""
        if not self.engine.jump_forward or room <= 0:
            return []
        self._sync(generated)
        if self.matcher.is_terminated():
            return []
        text = self.engine.forced_text(self.matcher, self.engine.max_jump_bytes)
        if not text:
            return []
        ids = self.engine.encode(text)[:-1][:room]
        probe = self.matcher.fork()
        out: list[int] = []
        for t in ids:
            if not probe.accept_token(int(t)):
                break
            out.append(int(t))
        return out

    def __call__(self, generated: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._sync(generated)
        allowed = self.engine.allowed(self.matcher)
        digits = self.digit_run >= self.engine.max_digit_run
        repeats = bool(generated) and self.repeat >= self.max_repeat  # no token more than max_repeat times in a row
        if digits or repeats:  # (most steps trip neither guard)
            banned = self.engine.digits_only.clone() if digits else torch.zeros_like(allowed)
            if repeats:
                banned[int(generated[-1])] = True
            if (allowed & ~banned).any():
                allowed = allowed & ~banned
        return logits.masked_fill(~allowed.to(logits.device)[: logits.shape[-1]], float("-inf"))


class GrammarCanvasHook:
    """Drafter hook enforcing a grammar inside the denoising loop (see module doc)."""

    def __init__(self, engine: GrammarEngine, compiled: Compiled, canvas_length: int):
        self.engine = engine
        self.compiled = compiled
        self.canvas_length = canvas_length
        self.masked_steps = 0  # a counter for tests and benchmarks, read by nothing else
        self._memo: tuple[tuple[int, ...], object] | None = None

    def _base(self, committed: Sequence[int]):
        """The matcher after the committed tokens (None once they left the grammar: an unconstrained
        canvas, no more guiding). A pure function of ``committed``, memoised for the steps of one
        canvas: ``pins`` and ``mask`` each derive it from their own argument, in any order."""
        key = tuple(int(t) for t in committed)
        if self._memo is None or self._memo[0] != key:
            m = self.compiled.matcher()
            ok = all(m.accept_token(t) for t in key)
            self._memo = (key, m if ok else None)
        return self._memo[1]

    def pins(self, canvas_index: int, committed: Sequence[int]) -> dict[int, int]:
        base = self._base(committed)
        if base is None:
            return {}
        forced = self.engine.forced_text(base, 4 * self.canvas_length)
        if not forced:
            return {}
        ids = self.engine.encode(forced)
        probe = base.fork()
        pins: dict[int, int] = {}
        for i, t in enumerate(ids[: self.canvas_length]):
            if not probe.accept_token(int(t)):
                break
            pins[i] = int(t)
        return pins

    def review(self, canvas_index, step, committed, after):
        return None  # the mask binds the argmax; acceptances are the sampler's

    def mask(self, canvas_index: int, step: int, committed: Sequence[int], logits: torch.Tensor, state=None):
        from .drafter import PositionMask

        base = self._base(committed)
        if base is None:
            return None
        m = base.fork()
        argmax = logits.argmax(-1).tolist()
        for p, t in enumerate(argmax):
            if m.is_terminated():  # after <eos>: the rest of the canvas is padding
                row = torch.zeros(logits.shape[-1], dtype=torch.bool)
                row[self.engine.pad_id] = row[self.engine.eos_id] = True
                return PositionMask(torch.arange(p, logits.shape[0]), row.expand(logits.shape[0] - p, -1))
            if not m.accept_token(int(t)):
                self.masked_steps += 1
                return PositionMask(torch.tensor([p]), self.engine.allowed(m).unsqueeze(0))
        return None  # the whole argmax canvas is grammatical: nothing to mask (no [canvas, vocab] mask built)
