"""Speculative decoding with a DiffusionGemma drafter and an AR verifier, lossless at greedy.

One round, with ``prefix`` the prompt plus everything accepted so far and ``c`` AR's greedy token
after it (known from the previous forward):

1. the drafter denoises a canvas after ``prefix`` with position 0 pinned to ``c``;
2. the verifier runs ONE forward over the canvas (its cache already holds ``prefix``): the logits
   at canvas position ``i`` give AR's greedy token after ``prefix + canvas[: i + 1]``;
3. the accepted prefix is ``canvas[:k]``: ``canvas[0] = c`` always, then every position whose token
   equals AR's greedy choice after the positions before it; the correction token is AR's greedy
   token after ``canvas[:k]`` and becomes the next round's pinned position 0;
4. the verifier's cache is cropped back to ``prefix + canvas[:k]``.

Worked example: ``c = 7``, canvas ``[7, 4, 9, 2]``, greedy-after ``[4, 9, 5, 8]``: positions 1 and 2
agree, position 3 does not (``2 != 5``), so ``k = 3``, the output grows by ``[7, 4, 9]`` and the next
round pins ``5``. Every emitted token is an AR greedy token, so the output equals AR-only greedy
decoding token for token; the drafter only decides how many tokens each forward yields.

Sampled verification (``temperature > 0``): the draft is a committed argmax canvas, i.e. a
deterministic proposal, so speculative sampling's rule becomes: with ``p`` the verifier's
distribution (at the temperature) after the positions before, accept draft token ``x`` with
probability ``p(x)``; on rejection draw the correction from ``p`` with ``x`` removed (renormalised);
after a fully accepted canvas draw the next token from ``p``. Each emitted token is then distributed
exactly as AR sampling would draw it: P(x) = p(x) * 1 + (1 - p(x)) * 0 for the draft token, and
(1 - p(x)) * p(y) / (1 - p(x)) = p(y) for any other ``y``.

With the drafter's own weights as verifier (``DiffusionCausalLM`` on the same model) the verify
forward IS the encoder pass that extends the drafter's context, so drafter and verifier share one
cache and a round costs one encoder forward plus the denoising steps. With a separate causal LM the
drafter's cache is extended by one extra encoder pass over the accepted tokens.

:func:`_round_loop` is the one loop; a **session** answers its three calls (first token, draft,
verify): :class:`SharedCacheSession` in this process (shared cache, greedy or sampled), or
:class:`RemoteSession` between two services that share no process or cache (an async
``draft_canvas``: a vLLM engine or :meth:`DiffusionDrafter.draft_canvas`; an async verifier: a vLLM
engine or the Verifier deployment over a Ray handle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Generator, Protocol, Sequence

import torch

from .acceptance import Verification, greedy_acceptance, sampled_acceptance
from .deadline import past
from .drafter import DiffusionDrafter, DraftRow, DraftSettings, PinFirst
from .temperature import is_greedy
from .verifier import ARVerifier, DiffusionCausalLM


@dataclass(frozen=True)
class SpeculativeResult:
    token_ids: tuple[int, ...]  # output tokens, <eos> excluded
    text: str
    finished: bool
    drafts: int  # rounds (one canvas drafted and verified per round)
    accepted: tuple[int, ...]  # tokens accepted per round (the pinned token included)
    verifier_forwards: int  # prefill + one verify forward per round
    denoising_steps: int
    total_s: float
    round_steps: tuple[int, ...] = ()  # denoising steps of each round's draft
    round_ends_s: tuple[float, ...] = ()  # seconds from the start to the end of each round
    corrections: tuple[int | None, ...] = ()  # each round's correction token (None: the decode ended)

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / max(1, len(self.accepted))


class RoundVerifier(Protocol):
    """What :func:`speculate_rounds` needs of a verifier (same tokenizer as the drafter)."""

    eos_ids: frozenset[int]

    async def next_token(self, prompt: Sequence[int]) -> int | None:
        """The greedy token after ``prompt``."""
        ...

    async def verify(self, prompt: Sequence[int], draft: Sequence[int]) -> Verification:
        """One forward over ``prompt + draft``: the longest greedy-agreeing draft prefix and the
        greedy token after it."""
        ...


# (prefix, pinned first token, width) -> the canvas and its denoising steps (None: not reported)
DraftCanvas = Callable[[Sequence[int], int, int], Awaitable[tuple[list[int], int | None]]]


class RoundSession(Protocol):
    """What the round loop asks of one decode, with methods plain (in-process, shared cache) or
    async (two services): ``first_token(prompt)``, the verifier's token after the prompt;
    ``draft(prefix, first, width)``, a canvas after ``prefix`` whose position 0 is ``first``, and
    its denoising steps; ``verify(prefix, canvas)``, one verifier forward over ``prefix + canvas``,
    keeping the accepted canvas prefix in whatever cache the session holds. ``verify`` returns a
    :class:`Verification` whose ``accepted`` counts the kept canvas tokens, ``canvas[0]`` (the
    verifier's own token) included."""

    eos_ids: frozenset[int]


Call = tuple[str, tuple]  # (session method, its arguments): what the loop asks for next


def _round_loop(prompt: Sequence[int], max_new_tokens: int, width: int, eos_ids: frozenset[int],
                detok: Callable[[list[int]], str], on_tokens: Callable[[list[int]], None] | None,
                deadline: float | None) -> Generator[Call, object, SpeculativeResult]:
    """THE round loop (rule above), written once and free of I/O: it yields the session calls it
    needs and is sent their answers, so :func:`run_rounds` drives it over plain methods and
    :func:`speculate_rounds` over awaited ones."""
    start = time.perf_counter()
    nxt = yield ("first_token", (list(prompt),))
    out: list[int] = []
    accepted: list[int] = []
    ends: list[float] = []
    steps: list[int] = []
    corrections: list[int | None] = []
    forwards, finished = 1, False
    while nxt is not None and len(out) < max_new_tokens and not past(deadline):
        if nxt in eos_ids:
            finished = True
            break
        prefix = list(prompt) + out
        canvas, n_steps = yield ("draft", (prefix, nxt, width))
        if n_steps is not None:
            steps.append(n_steps)
        canvas = list(canvas)[: max_new_tokens - len(out)] or [nxt]
        canvas[0] = nxt
        cut = next((i for i, t in enumerate(canvas) if t in eos_ids), None)
        canvas = canvas if cut is None else canvas[: cut + 1]
        v = yield ("verify", (prefix, canvas))
        forwards += 1
        keep = canvas[: max(1, v.accepted)]
        accepted.append(len(keep))
        corrections.append(None if any(t in eos_ids for t in keep) else v.correction)
        ends.append(time.perf_counter() - start)
        emitted = [t for t in keep if t not in eos_ids]
        out += emitted
        if on_tokens is not None and emitted:
            on_tokens(emitted)
        if len(emitted) < len(keep):
            finished = True
            break
        nxt = v.correction
    out = out[:max_new_tokens]
    return SpeculativeResult(token_ids=tuple(out), text=detok(out), finished=finished, drafts=len(accepted),
                             accepted=tuple(accepted), verifier_forwards=forwards, denoising_steps=sum(steps),
                             total_s=time.perf_counter() - start, round_steps=tuple(steps),
                             round_ends_s=tuple(ends), corrections=tuple(corrections))


def run_rounds(session: RoundSession, prompt: Sequence[int], max_new_tokens: int, width: int,
               detok: Callable[[list[int]], str], on_tokens: Callable[[list[int]], None] | None = None,
               deadline: float | None = None) -> SpeculativeResult:
    """The round loop over a session whose methods return their answers."""
    loop = _round_loop(prompt, max_new_tokens, width, session.eos_ids, detok, on_tokens, deadline)
    answer = None
    try:
        while True:
            name, args = loop.send(answer)
            answer = getattr(session, name)(*args)
    except StopIteration as stop:
        return stop.value


async def arun_rounds(session: RoundSession, prompt: Sequence[int], max_new_tokens: int, width: int,
                      detok: Callable[[list[int]], str], on_tokens: Callable[[list[int]], None] | None = None,
                      deadline: float | None = None) -> SpeculativeResult:
    """The round loop over a session whose methods are awaited."""
    loop = _round_loop(prompt, max_new_tokens, width, session.eos_ids, detok, on_tokens, deadline)
    answer = None
    try:
        while True:
            name, args = loop.send(answer)
            answer = await getattr(session, name)(*args)
    except StopIteration as stop:
        return stop.value


class RemoteSession:
    """Two services that share no process or cache: an async ``draft_canvas`` and a
    :class:`RoundVerifier`. Greedy: the verifier returns its choices, not its distribution."""

    def __init__(self, verifier: RoundVerifier, draft_canvas: DraftCanvas):
        self.verifier = verifier
        self.draft = draft_canvas
        self.eos_ids = verifier.eos_ids

    async def first_token(self, prompt: list[int]) -> int | None:
        return await self.verifier.next_token(prompt)

    async def verify(self, prefix: list[int], canvas: list[int]) -> Verification:
        return await self.verifier.verify(prefix, canvas)


async def speculate_rounds(verifier: RoundVerifier, draft_canvas: DraftCanvas, prompt: Sequence[int],
                           max_new_tokens: int, width: int, detok: Callable[[list[int]], str],
                           on_tokens: Callable[[list[int]], None] | None = None,
                           deadline: float | None = None) -> SpeculativeResult:
    """Greedy speculative decoding between two services (a :class:`RemoteSession`): a round costs
    one ``draft_canvas`` call and one ``verifier.verify`` call; the output is the verifier's greedy
    output, token for token."""
    return await arun_rounds(RemoteSession(verifier, draft_canvas), prompt, max_new_tokens, width, detok,
                             on_tokens, deadline)


class SharedCacheSession:
    """One decode with drafter and verifier in this process. With the drafter's own weights as
    verifier the verify forward IS the encoder pass that extends the drafter's context (one cache);
    with a separate causal LM the drafter's cache is extended by an encoder pass over the accepted
    tokens. Sampled at ``temperature > 0`` (see the module docstring)."""

    def __init__(self, decoder: "SpeculativeDecoder", prompt: list[int], max_new_tokens: int, seed: int,
                 temperature: float, deadline: float | None):
        self.d, self.lm = decoder.drafter, decoder.verifier.lm
        self.shared, self.settings, self.eos_ids = decoder.shared, decoder.settings, decoder.eos_ids
        self.prompt_len, self.budget, self.seed, self.deadline = len(prompt), max_new_tokens, seed, deadline
        self.temperature = temperature
        self.sampled = not is_greedy(temperature)
        self.gen = torch.Generator().manual_seed(seed) if self.sampled else None
        self.rounds = 0

    def _mask(self, n: int) -> torch.Tensor:
        return torch.ones(1, n, dtype=torch.bool, device=self.d.device)

    def _draw(self, row_logits: torch.Tensor) -> int:
        if not self.sampled:
            return int(row_logits.argmax())
        p = torch.softmax(row_logits.float().cpu() / self.temperature, -1)
        return int(torch.multinomial(p, 1, generator=self.gen))

    def first_token(self, prompt: list[int]) -> int:
        ids = torch.tensor([prompt], device=self.d.device)
        self.vcache = self.lm.new_cache()
        logits = self.lm.logits(ids, self._mask(len(prompt)), 0, self.vcache)
        self.dcache = self.vcache
        if not self.shared:  # the drafter keeps its own context cache
            self.dcache = self.d.new_cache()
            self.d.encode(self.dcache, ids, self._mask(len(prompt)), 0)
        return self._draw(logits[0, -1])

    def draft(self, prefix: list[int], first: int, width: int) -> tuple[list[int], int]:
        row = DraftRow(prompt_len=self.prompt_len, budget=self.budget, hook=PinFirst(first), deadline=self.deadline)
        row.tokens = prefix[self.prompt_len:]
        drafted = self.d.denoise_canvas(self.dcache, self._mask(len(prefix)), len(prefix), [row], self.rounds,
                                        self.seed, self.settings)
        self.rounds += 1
        return drafted.argmax[0].tolist(), drafted.steps[0]

    def verify(self, prefix: list[int], canvas: list[int]) -> Verification:
        cur = len(prefix)
        x = torch.tensor([canvas], device=self.d.device)
        vlog = self.lm.logits(x, self._mask(cur + len(canvas)), cur, self.vcache)[0]
        # canvas[0] is the verifier's own token; vlog[i] scores what follows canvas[: i + 1]
        if self.sampled:
            v = sampled_acceptance(canvas[1:], vlog, self.temperature, self.gen)
        else:
            v = greedy_acceptance(canvas[1:], vlog.argmax(-1).tolist())
        k = 1 + v.accepted
        if len(canvas) > k:
            self.vcache.crop(-(len(canvas) - k))
        if not self.shared:
            self.d.encode(self.dcache, torch.tensor([canvas[:k]], device=self.d.device), self._mask(cur + k), cur)
        return Verification(k, v.correction)


class SpeculativeDecoder:
    def __init__(self, drafter: DiffusionDrafter, verifier: ARVerifier, draft_steps: int | None = None):
        self.drafter = drafter
        self.verifier = verifier
        base = drafter.settings
        self.settings = base if draft_steps is None else DraftSettings(**{**base.__dict__, "max_steps": draft_steps})
        self.shared = isinstance(verifier.lm, DiffusionCausalLM) and verifier.lm.model is drafter.model
        self.eos_ids = verifier.eos_ids

    @torch.inference_mode()
    def generate(self, prompt: list[int], max_new_tokens: int = 256, seed: int | None = 0,
                 on_tokens: Callable[[list[int]], None] | None = None,
                 temperature: float = 0.0, deadline: float | None = None) -> SpeculativeResult:
        """The verifier's output for ``prompt``: greedy at ``temperature == 0`` (token for token),
        else distributed as its sampling at ``temperature``; ``on_tokens`` sees each round's output."""
        if not prompt:
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be positive")
        session = SharedCacheSession(self, list(prompt), max_new_tokens, seed if seed is not None else 0,
                                     temperature, deadline)
        tokenizer = self.drafter.tokenizer

        def detok(out: list[int]) -> str:
            return tokenizer.decode(out, skip_special_tokens=True)

        return run_rounds(session, prompt, max_new_tokens, self.drafter.canvas_length, detok, on_tokens, deadline)
