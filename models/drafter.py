"""DiffusionGemma drafter: batched block diffusion with per-step hooks.

The loop mirrors ``DiffusionGemmaForBlockDiffusion.generate`` (same sampler, temperature schedule,
self-conditioning and stable-and-confident stopping; see ``kernels/sampler.py`` for the words), but
keeps its state explicit per row so that:

* a :class:`CanvasHook` can pin canvas positions to fixed tokens and mask the vocabulary per
  position at every step (the validator's way in; a mask acts on logits, so it binds the committed
  argmax, not only samples);
* rows that hit ``<eos>`` or their token budget leave the batch, and each row reports its own
  steps per canvas, tokens per forward and timings;
* a callback sees every committed canvas (streaming by canvas), and another, where one is given,
  every denoising step of every row (the playground's view; nothing is copied when none is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from kernels import rng
from kernels.dispatch import ops, sampler_step, select_backend

from .architecture import SOFTCAP
from .deadline import past
from .loading import eos_ids, left_padded
from .transformers_compat import cache_kwarg


@dataclass(frozen=True)
class DraftSettings:
    max_steps: int = 16  # denoising steps per canvas at most
    entropy_bound: float = 0.1
    t_min: float = 0.4  # temperature at the last step
    t_max: float = 0.8  # temperature at the first step
    stability_threshold: int = 1  # steps the argmax must repeat before stopping
    confidence_threshold: float = 0.005  # mean entropy (nats) under which the canvas is confident

    @classmethod
    def from_generation_config(cls, gc) -> "DraftSettings":
        sampler = getattr(gc, "sampler_config", None)
        return cls(
            max_steps=gc.max_denoising_steps or cls.max_steps,
            entropy_bound=sampler.entropy_bound if sampler is not None else cls.entropy_bound,
            t_min=gc.t_min if gc.t_min is not None else cls.t_min,
            t_max=gc.t_max if gc.t_max is not None else cls.t_max,
            stability_threshold=(gc.stability_threshold if gc.stability_threshold is not None
                                 else cls.stability_threshold),
            confidence_threshold=gc.confidence_threshold or cls.confidence_threshold,
        )


@dataclass(frozen=True)
class PositionMask:
    """Vocabulary restrictions for some canvas positions (the rest of the canvas is free). A
    mask per restricted position only: at the real vocabulary a whole [canvas, vocab] mask is
    64 MiB per request per step."""

    positions: torch.Tensor  # [k] long, canvas positions
    allowed: torch.Tensor  # [k, vocab] bool (may be an expanded view of one row)

    @classmethod
    def full(cls, allowed: torch.Tensor) -> "PositionMask":
        """From a whole-canvas mask [canvas, vocab]."""
        return cls(torch.arange(allowed.shape[0]), allowed)


@dataclass(frozen=True)
class CanvasState:
    """One row's canvas as the decoder reads it at a step."""

    tokens: torch.Tensor  # [canvas] long: accepted tokens and renoised ones
    accepted: torch.Tensor  # [canvas] bool: positions accepted at the previous step (and pinned ones)
    entropy: torch.Tensor | None = None  # [canvas] float32 nats: the step's entropies (review only)


class CanvasHook(Protocol):
    """Per-request control of denoising. ``committed`` is the request's output so far."""

    def pins(self, canvas_index: int, committed: Sequence[int]) -> dict[int, int]:
        """Canvas positions fixed to a token for the whole canvas: ``{position: token_id}``."""
        ...

    def mask(self, canvas_index: int, step: int, committed: Sequence[int],
             logits: torch.Tensor, state: CanvasState) -> PositionMask | None:
        """Allowed tokens at some positions given this step's logits [canvas, vocab] and the
        canvas it was computed from, or None."""
        ...

    def review(self, canvas_index: int, step: int, committed: Sequence[int],
               after: CanvasState) -> torch.Tensor | None:
        """Positions [k] long to renoise instead of accepting, given the sampler's update
        ``after`` (the next step's canvas and acceptances), or None."""
        ...


class PinFirst:
    """Canvas hook pinning position 0 to a known token (a verify round's draft starts with the
    verifier's next token)."""

    def __init__(self, token: int):
        self.token = token

    def pins(self, canvas_index, committed):
        return {0: self.token}

    def mask(self, canvas_index, step, committed, logits, state):
        return None

    def review(self, canvas_index, step, committed, after):
        return None


@dataclass(frozen=True)
class Draft:
    token_ids: tuple[int, ...]  # output tokens, <eos> excluded
    text: str
    finished: bool  # True when <eos> was produced, False when the token budget ran out
    steps_per_canvas: tuple[int, ...]  # decoder forwards spent on each committed canvas
    tokens_per_forward: float  # (output tokens + <eos>) / decoder forwards
    first_canvas_s: float  # time to the first committed canvas (time to first token)
    total_s: float
    canvas_ends_s: tuple[float, ...] = ()  # seconds from the draft's start to each canvas commit
    tokens_per_canvas: tuple[int, ...] = ()  # output tokens each canvas added (<eos> excluded)
    expired: bool = False  # stopped at its deadline (models/deadline.py): the text is cut short


@dataclass(frozen=True)
class StepView:
    """One row's canvas after one denoising step, as a watcher sees it (``on_step``)."""

    row: int  # the prompt's index in the batch
    canvas_index: int
    step: int
    argmax: torch.Tensor  # [canvas] long: the step's argmax canvas
    accepted: torch.Tensor  # [canvas] bool: positions accepted for the next step (after any review)
    entropy: torch.Tensor  # [canvas] float32 nats


# called with each step of each active row, in the denoising thread: it must be quick
StepCallback = Callable[[StepView], None]


@dataclass(frozen=True)
class CanvasOutcome:
    """What denoising one canvas returns (the rows it was given are not changed)."""

    argmax: torch.Tensor  # [batch, canvas] long: the committed canvas
    steps: tuple[int, ...]  # [batch] decoder forwards each row spent
    expired: tuple[bool, ...]  # [batch] rows stopped at their deadline


@dataclass
class DraftRow:
    """Per-request state of a draft: budget, hook and what was committed so far."""

    prompt_len: int
    budget: int
    hook: CanvasHook | None
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    canvas_ends: list[float] = field(default_factory=list)
    canvas_tokens: list[int] = field(default_factory=list)
    finished: bool = False
    done: bool = False
    first_canvas_s: float = 0.0
    total_s: float = 0.0
    deadline: float | None = None  # time.time() after which the row stops (models/deadline.py)
    expired: bool = False
    index: int = 0  # the row's prompt index in the draft call


class DiffusionDrafter:
    """Drafts with a ``DiffusionGemmaForBlockDiffusion`` (any size: the tiny default or the 26B)."""

    def __init__(self, model, tokenizer, settings: DraftSettings | None = None, backend: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or DraftSettings.from_generation_config(model.generation_config)
        self.backend = backend or select_backend(model.device)  # sampler kernels (kernels/sampler.py)
        self._soft_embedding = ops(self.backend)[1]
        self.canvas_length = int(model.config.canvas_length)
        self.vocab_size = int(model.config.text_config.vocab_size)
        self.eos_ids = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path=None, device: str = "auto", dtype: str = "auto",
                        settings: DraftSettings | None = None) -> "DiffusionDrafter":
        from .loading import load_diffusion_model

        model, tokenizer = load_diffusion_model(path, device, dtype)
        return cls(model, tokenizer, settings)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _temperature(self, remaining: int, s: DraftSettings) -> float:
        return s.t_min + (s.t_max - s.t_min) * (remaining / s.max_steps)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def encode(self, cache, ids: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        """Run the causal encoder over ``ids`` [batch, n] at positions ``start..``, filling ``cache``."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
        lm = self.model.model.encoder.language_model
        lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions, **cache_kwarg(lm, cache))

    @torch.inference_mode()
    def draft(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int] = 256,
        hooks: Sequence[CanvasHook | None] | None = None,
        seed: int | None = None,
        on_canvas: Callable[[int, int, list[int]], None] | None = None,
        deadlines: Sequence[float | None] | None = None,
        on_step: StepCallback | None = None,
    ) -> list[Draft]:
        """Draft continuations of token-id ``prompts`` (one batch).

        ``on_canvas(row, canvas_index, new_token_ids)`` is called as each canvas is committed;
        ``on_step`` with a :class:`StepView` of each active row after each denoising step.
        A row past its ``deadlines`` entry leaves the batch at the next denoising step
        (``Draft.expired``).
        """
        if not prompts:
            return []
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(budgets) != len(prompts) or any(b <= 0 for b in budgets):
            raise ValueError("max_new_tokens must be positive, one per prompt")
        hooks = list(hooks) if hooks is not None else [None] * len(prompts)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        dev = self.device
        seed = seed if seed is not None else int(torch.randint(0, 2**31, (1,)).item())
        start = time.perf_counter()
        deadlines = list(deadlines) if deadlines is not None else [None] * len(prompts)
        rows = [DraftRow(len(p), b, h, deadline=t, index=i)
                for i, (p, b, h, t) in enumerate(zip(prompts, budgets, hooks, deadlines))]
        canvas_len = self.canvas_length

        ids, mask = left_padded(prompts, self.pad_id, dev)  # every row's answer starts at `width`
        width = ids.shape[1]
        cache = self.new_cache()
        self.encode(cache, ids, mask, 0)
        active = list(range(len(prompts)))  # batch index -> row index
        cur_len = width

        canvas_index = 0
        while active:
            out = self.denoise_canvas(cache, mask, cur_len, [rows[r] for r in active], canvas_index, seed,
                                      on_step=on_step)
            committed = out.argmax
            now = time.perf_counter() - start
            for b, r in enumerate(active):
                row = rows[r]
                row.steps.append(out.steps[b])
                row.expired = row.expired or out.expired[b]
                new = committed[b].tolist()[: row.budget - len(row.tokens)]
                cut = next((i for i, t in enumerate(new) if t in self.eos_ids), None)
                if cut is not None:
                    new, row.finished = new[:cut], True
                row.tokens.extend(new)
                row.canvas_ends.append(now)
                row.canvas_tokens.append(len(new))
                if canvas_index == 0:
                    row.first_canvas_s = now
                if on_canvas is not None:
                    on_canvas(r, canvas_index, new)
                if row.finished or row.expired or len(row.tokens) >= row.budget:
                    row.done, row.total_s = True, now
            keep = [b for b, r in enumerate(active) if not rows[r].done]
            if not keep:
                break
            # Commit: the canvas joins the encoder's context, finished rows leave the batch.
            new_mask = torch.cat([mask, torch.ones(len(active), canvas_len, dtype=torch.bool, device=dev)], 1)
            self.encode(cache, committed, new_mask, cur_len)
            cur_len += canvas_len
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep, device=dev))
                new_mask = new_mask[keep]
            mask = new_mask
            active = [active[b] for b in keep]
            canvas_index += 1

        drafts = []
        for row in rows:
            forwards = max(1, sum(row.steps))
            produced = len(row.tokens) + (1 if row.finished else 0)
            drafts.append(Draft(
                token_ids=tuple(row.tokens),
                text=self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                finished=row.finished,
                steps_per_canvas=tuple(row.steps),
                tokens_per_forward=produced / forwards,
                first_canvas_s=row.first_canvas_s,
                total_s=row.total_s,
                canvas_ends_s=tuple(row.canvas_ends),
                tokens_per_canvas=tuple(row.canvas_tokens),
                expired=row.expired,
            ))
        return drafts

    @torch.inference_mode()
    def draft_canvas(self, prefix: Sequence[int], first_token: int, width: int, seed: int = 0,
                     settings: DraftSettings | None = None) -> tuple[list[int], int]:
        """One canvas after ``prefix`` with position 0 pinned to ``first_token``: a verify round's
        draft when the verifier runs elsewhere (no cache is shared with it, so ``prefix`` is encoded
        afresh). Returns the canvas' first ``width`` tokens and the denoising steps spent."""
        if not prefix:
            raise ValueError("the prefix needs at least one token")
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        cache = self.new_cache()
        self.encode(cache, ids, mask, 0)
        row = DraftRow(prompt_len=len(prefix), budget=width, hook=PinFirst(first_token))
        out = self.denoise_canvas(cache, mask, len(prefix), [row], len(prefix), seed, settings)
        return out.argmax[0, :width].tolist(), out.steps[0]

    def decoder_hidden(self, canvas: torch.Tensor, soft: torch.Tensor | None, cache, mask_mapping,
                       positions: torch.Tensor) -> torch.Tensor:
        """The bidirectional decoder over ``canvas`` [batch, canvas] -> hidden [batch, canvas, hidden].

        Same computation as ``DiffusionGemmaDecoderModel.forward`` with ``self_conditioning_logits``,
        except that the self-conditioning input arrives as ``soft`` = softmax(previous logits) @
        embedding, computed by the sampler kernels without materialising the probabilities.
        """
        dec = self.model.model.decoder
        embeds = dec.embed_tokens(canvas)
        if soft is None:
            soft_in = torch.zeros_like(embeds)
        else:
            soft_in = soft.to(embeds.dtype) * dec.embed_tokens.embed_scale.to(embeds.dtype)
        h = dec.self_conditioning(embeds, soft_in)
        rope = {kind: dec.rotary_emb(h, positions, kind) for kind in dec.unique_layer_types}
        kinds = dec.text_config.layer_types
        for i, layer in enumerate(dec.layers[: dec.text_config.num_hidden_layers]):
            h = layer(h, position_embeddings=rope[kinds[i]], attention_mask=mask_mapping[kinds[i]],
                      position_ids=positions, **cache_kwarg(layer, cache))
        return dec.norm(h)

    def denoise_canvas(self, cache, ctx_mask: torch.Tensor, cur_len: int, rows: list[DraftRow],
                       canvas_index: int, seed: int, settings: DraftSettings | None = None,
                       on_step: StepCallback | None = None) -> CanvasOutcome:
        """Denoise one canvas after the ``cur_len`` tokens in ``cache`` (``ctx_mask`` [batch, cur_len]
        marks real ones) for the active ``rows`` (read only: their hooks, committed tokens and
        deadlines); returns a :class:`CanvasOutcome` (the committed argmax, the forwards each row
        spent, the rows stopped at their deadline); ``on_step`` sees each active row after each
        step. Randomness is a pure function of
        ``(seed, canvas_index, step)`` (``kernels/rng.py``)."""
        s = settings or self.settings
        dev = ctx_mask.device
        bsz, canvas_len, vocab = len(rows), self.canvas_length, self.vocab_size
        floor = torch.finfo(torch.float32).min

        pin_ids = torch.full((bsz, canvas_len), -1, dtype=torch.long, device=dev)
        for b, row in enumerate(rows):
            if row.hook is not None:
                for pos, tok in row.hook.pins(canvas_index, row.tokens).items():
                    pin_ids[b, pos] = tok
        pinned = pin_ids >= 0
        pin_rows, pin_cols = pinned.nonzero(as_tuple=True)

        canvas_seed = _mix(seed, canvas_index, 0xC0FFEE)
        cells = torch.arange(bsz * canvas_len, device=dev, dtype=torch.int64).view(bsz, canvas_len)
        canvas = rng.random_tokens(canvas_seed, cells, vocab)
        canvas = torch.where(pinned, pin_ids, canvas)
        dec_mask = torch.cat([ctx_mask, torch.ones(bsz, canvas_len, dtype=torch.bool, device=dev)], 1)
        make_mask = self.model.model.decoder.create_diffusion_decoder_attention_mask
        mask_mapping = make_mask(config=self.model.config, inputs_embeds=canvas.unsqueeze(-1),
                                 decoder_attention_mask=dec_mask, **cache_kwarg(make_mask, cache))
        positions = torch.arange(cur_len, cur_len + canvas_len, device=dev).unsqueeze(0)
        argmax = canvas
        accepted = pinned.clone()  # [batch, canvas] positions accepted at the previous step
        soft = None  # self-conditioning input [batch, canvas, hidden], from the previous step's logits
        done = torch.zeros(bsz, dtype=torch.bool, device=dev)
        repeats = torch.zeros(bsz, dtype=torch.long, device=dev)
        expired = [False] * bsz
        forwards = torch.zeros(bsz, dtype=torch.long, device=dev)
        embedding = self.model.model.decoder.embed_tokens.weight
        for step, remaining in enumerate(range(s.max_steps, 0, -1)):
            forwards += (~done).long()
            hidden = self.decoder_hidden(canvas, soft, cache, mask_mapping, positions)
            # softcap and temperature in place: the same operations in the same order as
            # softcapped(x) / t, without three [batch, canvas, vocab] temporaries (1 GiB each at
            # the real vocabulary, batch 4)
            logits = self.model.lm_head(hidden).float()
            logits.div_(SOFTCAP).tanh_().mul_(SOFTCAP).div_(self._temperature(remaining, s))
            for b, row in enumerate(rows):
                if row.hook is None or done[b]:
                    continue
                m = row.hook.mask(canvas_index, step, row.tokens, logits[b], CanvasState(canvas[b], accepted[b]))
                if m is not None:
                    pos = m.positions.to(dev)
                    logits[b, pos] = torch.where(m.allowed.to(dev), logits[b, pos], floor)
            if len(pin_rows):  # pinned positions: all mass on the pinned token (entropy 0, accepted)
                logits[pin_rows, pin_cols] = floor
                logits[pin_rows, pin_cols, pin_ids[pin_rows, pin_cols]] = 0.0
            step_seed = _mix(seed, canvas_index, step)
            st = sampler_step(logits, canvas, s.entropy_bound, step_seed, backend=self.backend)
            next_canvas, next_accepted = st.canvas, st.accepted
            unsettled = torch.zeros(bsz, dtype=torch.bool, device=dev)  # rows whose hook refused an acceptance
            for b, row in enumerate(rows):  # a hook may refuse acceptances (renoised instead)
                if row.hook is None or done[b]:
                    continue
                after = CanvasState(next_canvas[b], next_accepted[b], st.entropy[b])
                refused = row.hook.review(canvas_index, step, row.tokens, after)
                if refused is not None and len(refused):
                    unsettled[b] = True
                    refused = refused.to(dev)
                    if next_canvas is st.canvas:
                        next_canvas, next_accepted = st.canvas.clone(), st.accepted.clone()
                    next_canvas[b, refused] = rng.random_tokens(step_seed ^ 0x2E7013E, cells[b, refused], vocab)
                    next_accepted[b, refused] = False
            if on_step is not None:
                for b, row in enumerate(rows):
                    if not done[b]:
                        on_step(StepView(row.index, canvas_index, step, st.argmax[b], next_accepted[b], st.entropy[b]))
            same = (st.argmax == argmax).all(-1) & ~unsettled  # a canvas with refused cells has not settled
            repeats = torch.where(done, repeats, torch.where(same, repeats + 1, torch.zeros_like(repeats)))
            stable = repeats >= s.stability_threshold
            confident = st.entropy.mean(-1) < s.confidence_threshold
            keep = done.unsqueeze(-1)
            canvas = torch.where(keep, canvas, next_canvas)
            accepted = torch.where(keep, accepted, next_accepted)
            argmax = torch.where(keep, argmax, st.argmax)
            new_soft = self._soft_embedding(logits, embedding)
            soft = new_soft if soft is None else torch.where(keep.unsqueeze(-1), soft, new_soft)
            done = done | (stable & confident)
            for b, row in enumerate(rows):  # a row nobody waits for any more stops here
                if not done[b] and past(row.deadline):
                    expired[b] = True
                    done[b] = True
            if bool(done.all()):
                break
        return CanvasOutcome(argmax, tuple(int(f) for f in forwards), tuple(expired))


def _mix(seed: int, canvas_index: int, step: int) -> int:
    """A per-(canvas, step) seed for the stateless RNG."""
    x = torch.tensor([(seed & rng.MASK32) ^ ((canvas_index * 0x9E37) << 12) ^ (step * 0x85EB)], dtype=torch.int64)
    return int(rng.hash32(rng.hash32(x))[0])
