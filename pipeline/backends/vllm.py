"""The vLLM engines of ``models/vllm_backend.py`` behind the pipeline's service Protocols.

Same contract as ``pipeline/backends/transformers.py`` (which wraps the transformers backends): the orchestration
cannot tell them apart. Differences a user sees:

* ``repair`` regenerates under the constraint from scratch: vLLM's structured outputs start the
  grammar at the answer's first token, so a draft prefix cannot be resumed under it;
* the drafter applies no grammar inside the denoising loop (vLLM rejects structured output for
  DiffusionGemma); validation, repair and fallback still guarantee structured answers;
* a client's ``seed`` does not reach the drafter (vLLM refuses per-request seeds for diffusion
  models): the draft runs and ``stats.seed_ignored`` says so;
* the verify route runs :class:`pipeline.speculation.RoundSpeculation` over the drafter engine and an
  AR verifier (a co-located vLLM engine, or the Verifier deployment over a handle), greedy only
  (sampled verification redraws from the verifier's whole distribution, which vLLM's prompt
  logprobs do not return).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from typing import AsyncIterator

from models.constraints import GRAMMAR_KINDS

from .. import telemetry
from ..errors import BadRequest
from ..interfaces import Job, Stats, TextChunk, TextResult
from ..speculation import RoundSpeculation, shadow_agreement
from ..streaming import text_chunks
from ..tokens import detokenizer, encode_job


def _constraint(job: Job) -> tuple[str | None, object]:
    c = job.constraint
    return (c.kind, c.spec) if c is not None else (None, None)


class VLLMAR:
    """``ARService`` over a :class:`models.vllm_backend.VLLMCausal`."""

    def __init__(self, engine, tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        self._detok = detokenizer(tokenizer)

    async def generate(self, job: Job) -> TextResult:
        with telemetry.span("ar.generate", job.trace, attrs={"dgserve.backend": "vllm"}) as sp:
            prompt = encode_job(self.tokenizer, job)
            kind, spec = _constraint(job)
            r = await self.engine.generate(prompt, job.max_tokens, self._detok, job.temperature, job.seed, kind, spec)
            result = TextResult(r.text, len(prompt), len(r.token_ids), r.finished,
                                Stats(first_token_s=round(r.first_token_s, 4), ar_s=round(r.total_s, 4),
                                      constrained=kind in GRAMMAR_KINDS), tuple(r.token_ids))
            telemetry.attributes(sp, {telemetry.GEN_AI_INPUT_TOKENS: result.prompt_tokens,
                                      telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens})
            return result

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        """A from-scratch constrained answer (``repair_reused_tokens`` 0), so the orchestration does
        not run the same generate again as its fallback."""
        result = await self.generate(job)
        return replace(result, stats=result.stats.merged(repair_reused_tokens=0))

    # -- what a drafter elsewhere calls per verify round (models.speculative.RoundVerifier) -------
    @property
    def eos_ids(self) -> frozenset[int]:
        return self.engine.eos_ids

    async def next_token(self, prompt) -> int | None:
        return await self.engine.next_token(prompt)

    async def verify(self, prompt, draft):
        return await self.engine.verify(prompt, draft)

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        return await shadow_agreement(self.tokenizer, self.verify, job, answer)

    def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        prompt = encode_job(self.tokenizer, job)
        kind, spec = _constraint(job)
        ids = self.engine.stream(prompt, job.max_tokens, job.temperature, job.seed, kind, spec)
        return text_chunks(self.tokenizer, ids, lambda out, text: TextResult(
            text, len(prompt), len(out), len(out) < job.max_tokens, token_ids=tuple(out)))


def _ignored(job: Job) -> bool | None:
    """``stats.seed_ignored``: the diffusion runner cannot honour a seed (models/vllm_backend.py:DIFFUSION_REFUSED)."""
    return True if job.seed is not None else None


class VLLMDrafter:
    """``DraftService`` over a :class:`models.vllm_backend.VLLMDiffusion`; ``verifier`` (a
    :class:`models.speculative.RoundVerifier`: a co-located :class:`models.vllm_backend.VLLMCausal`
    or the Verifier deployment over a handle) serves the verify route, greedy only."""

    sampled_verify = False

    def __init__(self, engine, tokenizer, verifier=None, verify_width: int | None = None,
                 verify_steps: int | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self._detok = detokenizer(tokenizer)

        def draft_canvas(prefix, first_token, width):  # a verify round's draft, at its own step cap
            return engine.draft_canvas(prefix, first_token, width, verify_steps)

        self.rounds = (RoundSpeculation(tokenizer, draft_canvas, verifier, verify_width or engine.canvas_length)
                       if verifier is not None else None)

    def _stats(self, r, job: Job) -> Stats:
        canvases = max(1, math.ceil((len(r.token_ids) + r.finished) / self.engine.canvas_length))
        return Stats(backend="vllm", canvases=canvases, first_chunk_s=round(r.first_token_s, 4),
                     draft_s=round(r.total_s, 4), seed_ignored=_ignored(job))

    async def draft(self, job: Job) -> TextResult:
        with telemetry.span("drafter.draft", job.trace, attrs={"dgserve.backend": "vllm"}) as sp:
            prompt = encode_job(self.tokenizer, job)
            r = await self.engine.draft(prompt, job.max_tokens, self._detok)
            result = TextResult(r.text, len(prompt), len(r.token_ids), r.finished, self._stats(r, job),
                                tuple(r.token_ids))
            telemetry.attributes(sp, {telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens})
            telemetry.attributes(sp, result.stats.as_dict(), "dgserve.")
            return result

    async def draft_many(self, jobs) -> list[TextResult]:
        """What ``@serve.batch`` feeds: the engine batches concurrent requests itself."""
        return list(await asyncio.gather(*(self.draft(j) for j in jobs)))

    def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per committed canvas."""
        prompt = encode_job(self.tokenizer, job)
        canvases = []

        async def counted():
            async for ids in self.engine.canvases(prompt, job.max_tokens):
                canvases.append(len(ids))
                yield ids

        return text_chunks(self.tokenizer, counted(), lambda out, text: TextResult(
            text, len(prompt), len(out), len(out) < job.max_tokens,
            Stats(backend="vllm", canvases=len(canvases), seed_ignored=_ignored(job)), tuple(out)))

    def _rounds(self) -> RoundSpeculation:
        if self.rounds is None:
            raise BadRequest("the verify route needs an AR verifier beside the vLLM drafter "
                             "(verifier.source: causal)", param="route")
        return self.rounds

    async def speculate(self, job: Job) -> TextResult:
        return await self._rounds().speculate(job)

    def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        return self._rounds().speculate_stream(job)
