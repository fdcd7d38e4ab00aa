"""Autoregressive decoding and draft verification.

Two weight sources behind one :class:`CausalLM` interface:

* :class:`DiffusionCausalLM`: the DiffusionGemma checkpoint itself, decoding through its causal
  encoder and tied softcapped head (no second copy of the weights);
* :class:`TransformersCausalLM`: a separate transformers causal LM checkpoint (for instance the
  same weights exported as ``Gemma4ForCausalLM`` by ``models.export_ar``).

Verification: one forward over ``prefix + draft`` gives the greedy token after every
``prefix + draft[:i]``; ``models/acceptance.py`` holds the rule (accepted prefix + correction).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .acceptance import greedy_acceptance
from .architecture import softcapped
from .deadline import past
from .loading import eos_ids, left_padded
from .temperature import MIN_TEMPERATURE, is_greedy
from .transformers_compat import cache_kwarg

# A logits processor sees the tokens generated so far and the next-token logits [vocab].
LogitsProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]


def pick_token(row_logits: torch.Tensor, generated: Sequence[int], processor: LogitsProcessor | None,
               temperature: float, generator: torch.Generator | None) -> int:
    """One row's next token: its processor's mask, then greedy (``temperature`` below
    :data:`MIN_TEMPERATURE`) or a draw from ``generator``."""
    if processor is not None:
        row_logits = processor(generated, row_logits)
    if not is_greedy(temperature):
        probs = torch.softmax(row_logits.float() / temperature, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))
    return int(row_logits.argmax())


def jump_tokens(processor: LogitsProcessor | None, generated: Sequence[int], room: int) -> list[int]:
    """The tokens a processor forces after ``generated`` (jump-forward decoding; at most ``room``):
    a grammar's forced text (:meth:`models.grammar.GrammarProcessor.jump`), none for others."""
    jump = getattr(processor, "jump", None)
    return jump(generated, room) if jump is not None and room > 0 else []


def feed(lm: "CausalLM", rows: Sequence[Sequence[int]], lengths: Sequence[int], mask: torch.Tensor, cur: int,
         cache, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One forward feeding each row its new tokens (one, or more after a jump-forward) at its own
    positions (``lengths``: the row's tokens already in ``cache``). Rows with fewer tokens than the
    longest are padded on the right with masked columns. Returns the logits after each row's last
    token [batch, vocab], the mask and the batch's width."""
    dev = mask.device
    k = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [pad_id] * (k - len(r)) for r in rows], dtype=torch.long, device=dev)
    new = torch.tensor([[True] * len(r) + [False] * (k - len(r)) for r in rows], device=dev)
    positions = torch.tensor(list(lengths), device=dev).unsqueeze(1) + torch.arange(k, device=dev)
    mask = torch.cat([mask, new], 1)
    logits = lm.logits(ids, mask, cur, cache, positions)
    last = torch.tensor([len(r) - 1 for r in rows], device=dev)
    return logits[torch.arange(len(rows), device=dev), last], mask, cur + k


def columns(start: int, ids: torch.Tensor) -> torch.Tensor:
    """Positions ``start..start + n`` [1, n], shared by every row of ``ids`` [batch, n]."""
    return torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)


def row_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each left-padded row's own positions [batch, width]: 0 at its first real token (padding
    takes 0 too and is masked out), as the row has alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class CausalLM(Protocol):
    tokenizer: object
    device: torch.device

    def new_cache(self): ...

    def logits(self, ids: torch.Tensor, mask: torch.Tensor, start: int, cache,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits [batch, n, vocab] (float32) for ``ids`` [batch, n] placed at columns
        ``start..`` after what ``cache`` holds; ``mask`` [batch, start + n] marks real tokens.
        ``positions`` [batch, n] gives each row its own token positions (rotary), by default the
        columns themselves."""
        ...


class DiffusionCausalLM:
    """AR decoding with DiffusionGemma's causal encoder + tied lm_head + softcap."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.get_text_config(decoder=True))

    def logits(self, ids, mask, start, cache, positions=None):
        if positions is None:
            positions = columns(start, ids)
        lm = self.model.model.encoder.language_model
        out = lm(input_ids=ids, attention_mask=mask.long(), position_ids=positions, **cache_kwarg(lm, cache))
        return softcapped(self.model.lm_head(out.last_hidden_state))


class TransformersCausalLM:
    """AR decoding with any transformers ``AutoModelForCausalLM`` (softcap applied by the model)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def logits(self, ids, mask, start, cache, positions=None):
        if positions is None:
            positions = columns(start, ids)
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions,
                         past_key_values=cache, use_cache=True)
        return out.logits.float()


@dataclass(frozen=True)
class Generation:
    token_ids: tuple[int, ...]  # output tokens, <eos> excluded
    text: str
    finished: bool  # <eos> produced
    first_token_s: float
    total_s: float
    expired: bool = False  # stopped at its deadline before <eos> or the budget


class ARVerifier:
    """Greedy/sampled generation, token streaming and one-forward draft verification."""

    def __init__(self, lm: CausalLM, eos_ids: Sequence[int] | None = None):
        self.lm = lm
        self.tokenizer = lm.tokenizer
        eos = eos_ids if eos_ids is not None else [lm.tokenizer.eos_token_id]
        self.eos_ids = frozenset(eos)
        self.pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    @classmethod
    def from_diffusion_model(cls, model, tokenizer) -> "ARVerifier":
        return cls(DiffusionCausalLM(model, tokenizer), sorted(eos_ids(model, tokenizer)))

    @classmethod
    def from_pretrained(cls, path=None, source: str = "diffusion", device: str = "auto",
                        dtype: str = "auto") -> "ARVerifier":
        """``source="diffusion"``: a DiffusionGemma checkpoint decoded through its encoder;
        ``source="causal"``: a separate causal LM checkpoint."""
        from .loading import (
            DEFAULT_AR_CHECKPOINT,
            load_causal_model,
            load_diffusion_model,
        )

        if source == "diffusion":
            model, tokenizer = load_diffusion_model(path, device, dtype)
            return cls.from_diffusion_model(model, tokenizer)
        if source == "causal":
            model, tokenizer = load_causal_model(path or DEFAULT_AR_CHECKPOINT, device, dtype)
            return cls(TransformersCausalLM(model, tokenizer), sorted(eos_ids(model, tokenizer)))
        raise ValueError(f"unknown verifier source {source!r}; expected 'diffusion' or 'causal'")

    @property
    def device(self) -> torch.device:
        return self.lm.device

    # -- decoding ---------------------------------------------------------------------------
    @torch.inference_mode()
    def _steps(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], temperature: float,
               processors: Sequence[LogitsProcessor | None], seed: int | None,
               deadline: float | None = None) -> Iterator[tuple[list[int], list[list[int] | None]]]:
        """Yield, per decoding step, (row indices still running, the tokens each added, or None at
        its end): one token, or more when its processor forces what follows (:func:`jump_tokens`).
        Every row decodes at its own positions, as alone. Past ``deadline`` (models/deadline.py)
        no further step is taken."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        dev = self.device
        gen = torch.Generator(device=dev)
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
        ids, mask = left_padded(prompts, self.pad_id, dev)
        cache = self.lm.new_cache()
        logits = self.lm.logits(ids, mask, 0, cache, row_positions(mask))[:, -1]
        cur = ids.shape[1]
        active = list(range(len(prompts)))
        generated: list[list[int]] = [[] for _ in prompts]
        while active and not past(deadline):
            added: list[list[int] | None] = []
            for b, r in enumerate(active):
                tok = pick_token(logits[b], generated[r], processors[r], temperature, gen)
                if tok in self.eos_ids:
                    added.append(None)
                    continue
                generated[r].append(tok)
                forced = jump_tokens(processors[r], generated[r], budgets[r] - len(generated[r]))
                generated[r].extend(forced)
                added.append([tok] + forced)
            yield list(active), list(added)
            keep = [b for b, r in enumerate(active) if added[b] is not None and len(generated[r]) < budgets[r]]
            if not keep:
                return
            if len(keep) < len(active):
                cache.batch_select_indices(torch.tensor(keep, device=dev))
                mask = mask[keep]
            active = [active[b] for b in keep]
            rows = [added[b] for b in keep]
            lengths = [len(prompts[r]) + len(generated[r]) - len(t) for r, t in zip(active, rows)]
            logits, mask, cur = feed(self.lm, rows, lengths, mask, cur, cache, self.pad_id)

    def stream(self, prompt: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
               logits_processor: LogitsProcessor | None = None, seed: int | None = None,
               deadline: float | None = None) -> Iterator[int]:
        """Yield output token ids one by one (``<eos>`` is not yielded)."""
        _check_budget(max_new_tokens)
        for _, toks in self._steps([prompt], [max_new_tokens], temperature, [logits_processor], seed, deadline):
            yield from toks[0] or ()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 256,
                 temperature: float = 0.0, logits_processors: Sequence[LogitsProcessor | None] | None = None,
                 seed: int | None = None, deadline: float | None = None) -> list[Generation]:
        """Batched generation (greedy at ``temperature == 0``); past ``deadline`` every row stops
        where it is (``Generation.expired``)."""
        budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        for b in budgets:
            _check_budget(b)
        processors = list(logits_processors) if logits_processors is not None else [None] * len(prompts)
        start = time.perf_counter()
        out: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        first = [0.0] * len(prompts)
        total = [0.0] * len(prompts)
        for rows, toks in self._steps(prompts, budgets, temperature, processors, seed, deadline):
            now = time.perf_counter() - start
            for r, new in zip(rows, toks):
                if not out[r] and not finished[r]:
                    first[r] = now
                if new is None:
                    finished[r] = True
                else:
                    out[r].extend(new)
                total[r] = now
        expired = past(deadline)
        return [Generation(tuple(o), self.tokenizer.decode(o, skip_special_tokens=True), f, a, t,
                           expired and not f and len(o) < n)
                for o, f, a, t, n in zip(out, finished, first, total, budgets)]

    # -- verification -----------------------------------------------------------------------
    @torch.inference_mode()
    def greedy_after(self, prefix_ids: Sequence[int], draft_ids: Sequence[int]) -> list[int]:
        """Greedy next tokens after ``prefix + draft[:i]`` for i = 0..len(draft), in one forward."""
        if len(prefix_ids) == 0:
            raise ValueError("prefix must hold at least one token")
        seq = torch.tensor([list(prefix_ids) + list(draft_ids)], dtype=torch.long, device=self.device)
        mask = torch.ones_like(seq, dtype=torch.bool)
        logits = self.lm.logits(seq, mask, 0, self.lm.new_cache())[0]
        return logits[len(prefix_ids) - 1:].argmax(-1).tolist()

    def verify(self, prefix_ids: Sequence[int], draft_ids: Sequence[int]) -> tuple[int, int]:
        """``(accepted_len, next_token)`` for ``draft_ids`` after ``prefix_ids`` (the rule of
        ``models/acceptance.py``)."""
        v = greedy_acceptance(list(draft_ids), self.greedy_after(prefix_ids, draft_ids))
        return v.accepted, v.correction


def _check_budget(n: int) -> None:
    if n <= 0:
        raise ValueError("max_new_tokens must be positive")
