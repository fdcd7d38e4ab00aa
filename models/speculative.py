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

:func:`speculate_rounds` runs the same greedy rounds between two services that do not share a
process or a cache: an async ``draft_canvas`` (a vLLM engine, or :meth:`DiffusionDrafter.draft_canvas`)
and an async verifier (a vLLM engine, or the Verifier deployment over a Ray handle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, Sequence

import torch

from .acceptance import Verification, greedy_acceptance, sampled_acceptance
from .deadline import past
from .drafter import DiffusionDrafter, DraftRow, DraftSettings, PinFirst
from .verifier import MIN_TEMPERATURE, ARVerifier, DiffusionCausalLM


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


async def speculate_rounds(verifier: RoundVerifier, draft_canvas: DraftCanvas, prompt: Sequence[int],
                           max_new_tokens: int, width: int, detok: Callable[[list[int]], str],
                           on_tokens: Callable[[list[int]], None] | None = None,
                           deadline: float | None = None) -> SpeculativeResult:
    """Greedy speculative decoding between two services: each round ``draft_canvas(prefix,
    first_token, width)`` proposes a canvas whose first token is the verifier's known next token;
    ``verifier.verify`` accepts its longest greedy-agreeing prefix and names the correction token,
    which starts the next round. The output is the verifier's greedy output, token for token (the
    rule of :class:`SpeculativeDecoder`); a round costs one draft and one verifier call."""
    start = time.perf_counter()
    nxt = await verifier.next_token(prompt)
    out: list[int] = []
    accepted: list[int] = []
    ends: list[float] = []
    steps: list[int] = []
    forwards, finished = 1, False
    while nxt is not None and len(out) < max_new_tokens and not past(deadline):
        if nxt in verifier.eos_ids:
            finished = True
            break
        prefix = list(prompt) + out
        canvas, n_steps = await draft_canvas(prefix, nxt, width)
        if n_steps is not None:
            steps.append(n_steps)
        canvas = list(canvas)[: max_new_tokens - len(out)] or [nxt]
        canvas[0] = nxt
        cut = next((i for i, t in enumerate(canvas) if t in verifier.eos_ids), None)
        canvas = canvas if cut is None else canvas[: cut + 1]
        v = await verifier.verify(prefix, canvas)
        forwards += 1
        keep = canvas[: max(1, v.accepted)]
        accepted.append(len(keep))
        ends.append(time.perf_counter() - start)
        emitted = [t for t in keep if t not in verifier.eos_ids]
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
                             round_ends_s=tuple(ends))


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
        start = time.perf_counter()
        d, lm = self.drafter, self.verifier.lm
        dev = d.device
        seed = seed if seed is not None else 0

        ids = torch.tensor([prompt], device=dev)
        vcache = lm.new_cache()
        logits = lm.logits(ids, torch.ones_like(ids, dtype=torch.bool), 0, vcache)
        dcache = vcache
        if not self.shared:  # the drafter keeps its own context cache
            dcache = d.new_cache()
            d.encode(dcache, ids, torch.ones_like(ids, dtype=torch.bool), 0)
        sampled = temperature >= MIN_TEMPERATURE
        gen = torch.Generator().manual_seed(seed) if sampled else None

        def draw(row_logits: torch.Tensor) -> int:
            if not sampled:
                return int(row_logits.argmax())
            p = torch.softmax(row_logits.float().cpu() / temperature, -1)
            return int(torch.multinomial(p, 1, generator=gen))

        nxt = draw(logits[0, -1])
        cur = len(prompt)
        out: list[int] = []
        accepted: list[int] = []
        round_steps: list[int] = []
        round_ends: list[float] = []
        forwards, steps, finished = 1, 0, False
        while not past(deadline):
            if nxt in self.eos_ids:
                finished = True
                break
            row = DraftRow(prompt_len=len(prompt), budget=max_new_tokens, hook=PinFirst(nxt), deadline=deadline)
            row.tokens = out
            ctx_mask = torch.ones(1, cur, dtype=torch.bool, device=dev)
            drafted = d.denoise_canvas(dcache, ctx_mask, cur, [row], len(accepted), seed, self.settings)
            canvas = drafted.argmax[0].tolist()
            steps += drafted.steps[0]
            round_steps.append(drafted.steps[0])
            canvas = canvas[: max_new_tokens - len(out)]
            cut = next((i for i, t in enumerate(canvas) if t in self.eos_ids), None)
            if cut is not None:
                canvas = canvas[: cut + 1]
            x = torch.tensor([canvas], device=dev)
            vlog = lm.logits(x, torch.ones(1, cur + len(canvas), dtype=torch.bool, device=dev), cur, vcache)[0]
            forwards += 1
            # canvas[0] is the verifier's own token; vlog[i] scores what follows canvas[: i + 1]
            if sampled:
                v = sampled_acceptance(canvas[1:], vlog, temperature, gen)
            else:
                v = greedy_acceptance(canvas[1:], vlog.argmax(-1).tolist())
            k, correction = 1 + v.accepted, v.correction
            keep = canvas[:k]
            if len(canvas) > k:
                vcache.crop(-(len(canvas) - k))
            if not self.shared:
                kt = torch.tensor([keep], device=dev)
                d.encode(dcache, kt, torch.ones(1, cur + k, dtype=torch.bool, device=dev), cur)
            cur += k
            accepted.append(k)
            round_ends.append(time.perf_counter() - start)
            emitted = keep[:-1] if keep[-1] in self.eos_ids else keep
            out.extend(emitted)
            if on_tokens is not None and emitted:
                on_tokens(list(emitted))
            if keep[-1] in self.eos_ids:
                finished = True
                break
            if len(out) >= max_new_tokens:
                break
            nxt = correction
        return SpeculativeResult(
            token_ids=tuple(out),
            text=d.tokenizer.decode(out, skip_special_tokens=True),
            finished=finished,
            drafts=len(accepted),
            accepted=tuple(accepted),
            verifier_forwards=forwards,
            denoising_steps=steps,
            total_s=time.perf_counter() - start,
            round_steps=tuple(round_steps),
            round_ends_s=tuple(round_ends),
        )
