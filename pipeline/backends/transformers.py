"""The transformers backends (``models/``) behind the pipeline's service Protocols: the drafter, AR
decoding under the grammar, and repair. Model calls run in a worker thread (registered with the
replica's :class:`pipeline.health.WorkTracker`) so the event loop keeps serving while a batch
denoises."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import AsyncIterator, Sequence

from .. import telemetry
from ..errors import BadRequest
from ..health import WorkTracker, batch_deadline, tracked
from ..interfaces import Job, Stats, TextChunk, TextResult
from ..speculation import RoundSpeculation, shadow_agreement, speculative_result
from ..streaming import stream_in_thread
from ..tokens import encode_job
from ..watch import canvas_step


def grammar_for(decoding, job: Job, build):
    """``build()`` a decoding object (canvas hook, AR processor, ...) for ``job``'s constraint from
    ``decoding`` (a :class:`models.decoding.ConstraintDecoding`), or None when there is none or the
    engine cannot compile it (decoding then runs free and validation alone decides). A compile
    that runs past its time cap is the client's problem: a 400."""
    from models.grammar import GrammarError, GrammarTimeout

    c = job.constraint
    if c is None or decoding is None or not decoding.supports(c.kind):
        return None
    try:
        return build()
    except GrammarTimeout as e:
        raise BadRequest(f"response_format is too complex: {e}", param="response_format") from None
    except GrammarError:
        return None


def draft_stats(d, **extra) -> Stats:
    n = len(d.steps_per_canvas)
    return Stats(canvases=n, canvas_steps=tuple(d.steps_per_canvas), denoising_steps=sum(d.steps_per_canvas),
                 steps_per_canvas=round(sum(d.steps_per_canvas) / max(1, n), 2),
                 tokens_per_forward=round(d.tokens_per_forward, 2), first_chunk_s=round(d.first_canvas_s, 4),
                 draft_s=round(d.total_s, 4), expired=True if d.expired else None, **extra)


class TransformersDrafter:
    """``DraftService`` over a :class:`models.drafter.DiffusionDrafter`. The verify route is served
    by ``speculative`` (a :class:`models.speculative.SpeculativeDecoder`: verifier in this process,
    sharing the drafter's cache) or by ``rounds`` (a :class:`RoundSpeculation`: verifier elsewhere)."""

    def __init__(self, drafter, speculative=None, decoding=None, rounds: RoundSpeculation | None = None,
                 work: WorkTracker | None = None):
        self.drafter = drafter
        self.work = work or WorkTracker()
        self.tokenizer = drafter.tokenizer
        self.speculative = speculative
        self.rounds = rounds
        self.sampled_verify = rounds is None and speculative is not None
        self.decoding = decoding  # canvas-aware drafting for constrained jobs when set

    def _hook(self, job: Job):
        c = job.constraint
        return grammar_for(self.decoding, job,
                           lambda: self.decoding.canvas_hook(c.kind, c.spec, self.drafter.canvas_length))

    def _spec(self):
        if self.speculative is None:
            raise RuntimeError("this drafter has no verifier for the verify route")
        return self.speculative

    def speculate_sync(self, job: Job) -> TextResult:
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()
        r = self._spec().generate(prompt, job.max_tokens, seed=job.seed, temperature=job.temperature,
                                  deadline=job.deadline)
        telemetry.record_speculation(job.trace, start, r)
        return speculative_result(prompt, r, self.tokenizer if job.watch else None)

    async def speculate(self, job: Job) -> TextResult:
        if self.rounds is not None:
            return await self.rounds.speculate(job)
        return await asyncio.to_thread(tracked(self.work, job.deadline, self.speculate_sync), job)

    def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        if self.rounds is not None:
            return self.rounds.speculate_stream(job)
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()

        def finish(r, ids):
            telemetry.record_speculation(job.trace, start, r)
            return speculative_result(prompt, r, self.tokenizer if job.watch else None)

        def produce(emit):
            return self._spec().generate(prompt, job.max_tokens, seed=job.seed, on_tokens=emit,
                                         temperature=job.temperature, deadline=job.deadline)

        return stream_in_thread(self.tokenizer, tracked(self.work, job.deadline, produce), finish)

    def draft_many_sync(self, jobs: Sequence[Job]) -> list[TextResult]:
        """Draft several jobs as ONE denoising batch (what ``@serve.batch`` feeds)."""
        prompts = [encode_job(self.tokenizer, j) for j in jobs]
        seed = next((j.seed for j in jobs if j.seed is not None), None)
        hooks = [self._hook(j) for j in jobs]
        start = telemetry.now_ns()
        drafts = self.drafter.draft(prompts, max_new_tokens=[j.max_tokens for j in jobs], hooks=hooks, seed=seed,
                                    deadlines=[j.deadline for j in jobs])
        for j, d in zip(jobs, drafts):  # one batch, one span tree per request's own trace
            telemetry.record_draft(j.trace, start, d, len(jobs))
        return [TextResult(d.text, len(p), len(d.token_ids), d.finished,
                           draft_stats(d, batch_size=len(jobs), canvas_guided=h is not None), d.token_ids)
                for p, d, h in zip(prompts, drafts, hooks)]

    async def draft_many(self, jobs: Sequence[Job]) -> list[TextResult]:
        jobs = list(jobs)
        return await asyncio.to_thread(tracked(self.work, batch_deadline(jobs), self.draft_many_sync), jobs)

    async def draft(self, job: Job) -> TextResult:
        return (await self.draft_many([job]))[0]

    def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per committed canvas; a watched job (``job.watch``) also sends each denoising
        step (:class:`pipeline.watch.CanvasStep`) as it happens."""
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()
        box: dict = {}

        def produce(emit):
            box["hook"] = hook = self._hook(job)  # a grammar compile: in this thread, off the event loop
            on_step = (lambda view: emit(canvas_step(self.tokenizer, view))) if job.watch else None
            return self.drafter.draft([prompt], max_new_tokens=job.max_tokens, hooks=[hook], seed=job.seed,
                                      on_canvas=lambda row, idx, new: emit(list(new)), deadlines=[job.deadline],
                                      on_step=on_step)[0]

        def finish(d, ids):
            telemetry.record_draft(job.trace, start, d, 1)
            return TextResult(d.text, len(prompt), len(d.token_ids), d.finished,
                              draft_stats(d, canvas_guided=box.get("hook") is not None), d.token_ids)

        return stream_in_thread(self.tokenizer, tracked(self.work, job.deadline, produce), finish)


class TransformersAR:
    """``ARService`` over a :class:`models.verifier.ARVerifier`, its decoding continuously batched
    (:class:`models.ar_batch.ARBatcher`): generate, stream, repair and fallback requests join and
    leave one running batch per decode step, each with its own grammar matcher, budget and seed.

    With ``decoding`` (a :class:`models.decoding.ConstraintDecoding`), jobs with a constraint it
    supports decode under it (a grammar: valid by construction; Sudoku: the per-cell digit masks);
    ``repair`` continues a draft under it from the longest prefix it accepts.
    """

    def __init__(self, verifier, decoding=None, work: WorkTracker | None = None, batcher=None,
                 max_num_seqs: int = 8, kv_layout: str = "auto", prefix_cache_tokens: int = 0):
        from models.ar_batch import ARBatcher

        self.verifier = verifier
        self.work = work or WorkTracker()
        self.tokenizer = verifier.tokenizer
        self.decoding = decoding
        self.batcher = batcher or ARBatcher(verifier, max_num_seqs, kv_layout=kv_layout,
                                            prefix_cache_tokens=prefix_cache_tokens)

    def _processor(self, job: Job, prefix: Sequence[int] = ()):
        c = job.constraint
        return grammar_for(self.decoding, job, lambda: self.decoding.processor(c.kind, c.spec, prefix))

    async def _run(self, job: Job, prompt: list[int], prefix: list[int], budget: int) -> TextResult:
        processor = await asyncio.to_thread(self._processor, job, prefix)  # a compile may take a while
        with self.work.track(job.deadline):
            g = await asyncio.wrap_future(self.batcher.submit(
                prompt + prefix, budget, job.temperature, processor, job.seed, job.deadline))
        ids = prefix + list(g.token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return TextResult(text, len(prompt), len(ids), g.finished,
                          Stats(first_token_s=round(g.first_token_s, 4), ar_s=round(g.total_s, 4),
                                constrained=processor is not None, expired=True if g.expired else None), tuple(ids))

    async def generate(self, job: Job) -> TextResult:
        with telemetry.span("ar.generate", job.trace) as sp:
            result = await self._run(job, encode_job(self.tokenizer, job), [], job.max_tokens)
            _ar_attributes(sp, result)
            return result

    def _repair_prefix(self, job: Job, draft: TextResult) -> tuple[list[int], int | None]:
        """The draft's token ids (its own where it carries them, else its text tokenized) and how
        many of them the grammar accepts (None: no grammar for this constraint)."""
        c = job.constraint
        ids = (list(draft.token_ids) if draft.token_ids is not None
               else self.tokenizer(draft.text, add_special_tokens=False)["input_ids"])[: job.max_tokens - 1]
        return ids, grammar_for(self.decoding, job, lambda: self.decoding.longest_prefix(c.kind, c.spec, ids))

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        """Keep the longest draft prefix the grammar accepts; AR continues under the grammar."""
        with telemetry.span("ar.repair", job.trace) as sp:
            prompt = encode_job(self.tokenizer, job)
            ids, keep = await asyncio.to_thread(self._repair_prefix, job, draft)
            if keep is None:  # no grammar for this constraint: answer afresh
                result = await self._run(job, prompt, [], job.max_tokens)
            else:
                result = await self._run(job, prompt, ids[:keep], job.max_tokens - keep)
                kept = len(self.tokenizer.decode(ids[:keep], skip_special_tokens=True))
                result = replace(result, stats=result.stats.merged(repair_reused_tokens=keep, repair_reused_chars=kept,
                                                                   draft_tokens=len(ids)))
            _ar_attributes(sp, result)
            return result

    # -- what a drafter elsewhere calls per verify round (models.speculative.RoundVerifier) -------
    @property
    def eos_ids(self) -> frozenset[int]:
        return self.verifier.eos_ids

    async def next_token(self, prompt: Sequence[int]) -> int | None:
        return (await self.verify(prompt, [])).correction

    async def verify(self, prompt: Sequence[int], draft: Sequence[int]):
        from models.acceptance import Verification

        accepted, nxt = await asyncio.to_thread(self.verifier.verify, list(prompt), list(draft))
        return Verification(accepted, nxt)

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        return await shadow_agreement(self.tokenizer, self.verify, job, answer)

    def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per token, as the running batch produces it."""
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()

        def produce(emit):  # a consumer that went away makes emit raise: the row leaves the batch
            processor = self._processor(job)
            return self.batcher.generate(prompt, job.max_tokens, temperature=job.temperature, processor=processor,
                                         seed=job.seed, deadline=job.deadline, on_token=lambda tok: emit([tok]))

        def finish(g, ids):
            result = TextResult(self.tokenizer.decode(ids, skip_special_tokens=True), len(prompt), len(ids),
                                g.finished, token_ids=tuple(ids))
            sp = telemetry.tracer().start_span("ar.stream", context=telemetry.parent(job.trace), start_time=start)
            _ar_attributes(sp, result)
            sp.end()
            return result

        return stream_in_thread(self.tokenizer, tracked(self.work, job.deadline, produce), finish)


def _ar_attributes(span, result: TextResult) -> None:
    telemetry.attributes(span, {telemetry.GEN_AI_INPUT_TOKENS: result.prompt_tokens,
                                telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens,
                                "dgserve.finished": result.finished})
    telemetry.attributes(span, result.stats.as_dict(), "dgserve.")
