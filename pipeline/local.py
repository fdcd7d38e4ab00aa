"""In-process backends: the model objects of ``models/`` behind the async service Protocols.

The Ray deployments hold these too; tests and benchmarks use them directly. Model calls run in a
worker thread so the event loop keeps serving while a batch denoises.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator, Callable, Iterator, Sequence

from . import telemetry
from .errors import BadRequest
from .health import WorkTracker
from .interfaces import Job, TextChunk, TextResult
from .validation import ValidatorRegistry, default_registry


def encode_job(tokenizer, job: Job) -> list[int]:
    """Prompt token ids: the chat template for ``messages``, ``<bos>`` + text for ``prompt``."""
    if job.messages is not None:
        from models.tokenizer import encode_messages

        return encode_messages(tokenizer, [{"role": r, "content": c} for r, c in job.messages])
    ids = tokenizer(job.prompt or "", add_special_tokens=False)["input_ids"]
    return [tokenizer.bos_token_id] + list(ids)


class TextDelta:
    """Turns a growing token list into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece


class Cancelled(Exception):
    """Raised inside a producer thread once its consumer went away."""


async def _iterate_in_thread(produce: Callable[[Callable[[object], None]], object]) -> AsyncIterator[object]:
    """Run ``produce(emit)`` in a thread; yield what it emits, then its return value (as a tuple
    ``("__result__", value)``). Exceptions in the thread re-raise here. When the consumer stops
    early, the next ``emit`` raises :class:`Cancelled` in the thread, which ends the model call."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    cancelled = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone
            cancelled.set()

    def emit(item) -> None:
        if cancelled.is_set():
            raise Cancelled()
        put(item)

    def run() -> None:
        try:
            put(("__result__", produce(emit)))
        except Cancelled:
            pass
        except BaseException as e:  # re-raised on the event loop side
            put(("__error__", e))
        finally:
            put(done)

    threading.Thread(target=run, daemon=True).start()
    try:
        while True:
            item = await queue.get()
            if item is done:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "__error__":
                raise item[1]
            yield item
    finally:
        cancelled.set()


async def text_chunks(tokenizer, pieces: AsyncIterator[list[int]], finish) -> AsyncIterator[TextChunk]:
    """Text chunks of token-id ``pieces`` (incomplete UTF-8 held back); the last chunk carries
    ``finish(ids, text)``, the closing :class:`TextResult`."""
    delta = TextDelta(tokenizer)
    async for ids in pieces:
        text = delta.push(ids)
        if text:
            yield TextChunk(text)
    yield TextChunk("", finish(delta.ids, tokenizer.decode(delta.ids, skip_special_tokens=True)))


def _stream_in_thread(tokenizer, produce, finish) -> AsyncIterator[TextChunk]:
    """Text chunks from a model call in a thread: ``produce(emit)`` emits token-id lists and returns
    the call's result; ``finish(result, ids)`` turns it into the closing :class:`TextResult`."""
    box: dict = {}

    async def pieces():
        async for item in _iterate_in_thread(produce):
            if isinstance(item, tuple) and item[0] == "__result__":
                box["result"] = item[1]
            else:
                yield item
        if "result" not in box:  # only after the consumer went away, so nobody reads this
            raise RuntimeError("the model call ended without a result")

    return text_chunks(tokenizer, pieces(), lambda ids, text: finish(box["result"], ids))


def tracked(work: WorkTracker, deadline: float | None, fn: Callable) -> Callable:
    """``fn`` registered with ``work`` while it runs (in its worker thread, so a call whose awaiting
    coroutine was cancelled still counts until the model loop really returns)."""

    def run(*args):
        with work.track(deadline):
            return fn(*args)

    return run


def batch_deadline(jobs: Sequence[Job]) -> float | None:
    """A batch runs until its last row's deadline at most (rows leave at their own)."""
    return None if any(j.deadline is None for j in jobs) else max(j.deadline for j in jobs)


def grammar_for(grammar, job: Job, build):
    """``build()`` a grammar object for ``job``'s constraint, or None when there is none or the
    engine cannot compile it (decoding then runs free and validation alone decides). A compile
    that runs past its time cap is the client's problem: a 400."""
    from models.grammar import GrammarError, GrammarTimeout

    c = job.constraint
    if c is None or grammar is None or not grammar.supports(c.kind):
        return None
    try:
        return build()
    except GrammarTimeout as e:
        raise BadRequest(f"response_format is too complex: {e}", param="response_format") from None
    except GrammarError:
        return None


def draft_stats(d) -> dict:
    return {
        "canvases": len(d.steps_per_canvas),
        "canvas_steps": list(d.steps_per_canvas),
        "denoising_steps": sum(d.steps_per_canvas),
        "steps_per_canvas": round(sum(d.steps_per_canvas) / max(1, len(d.steps_per_canvas)), 2),
        "tokens_per_forward": round(d.tokens_per_forward, 2),
        "first_chunk_s": round(d.first_canvas_s, 4),
        "draft_s": round(d.total_s, 4),
    }


def speculative_result(prompt: Sequence[int], r) -> TextResult:
    """The :class:`TextResult` of a finished speculative decode (:class:`models.speculative.SpeculativeResult`)."""
    return TextResult(r.text, len(prompt), len(r.token_ids), r.finished, {
        "drafts": r.drafts,
        "mean_accepted": round(r.mean_accepted, 3),
        "accepted": list(r.accepted),
        "verifier_forwards": r.verifier_forwards,
        "verifier_forwards_per_token": round(r.verifier_forwards / max(1, len(r.token_ids)), 3),
        "denoising_steps": r.denoising_steps,
        "verify_s": round(r.total_s, 4),
    })


def detokenizer(tokenizer) -> Callable[[Sequence[int]], str]:
    """Token ids -> text, special tokens dropped (what the engines' results carry)."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


class RoundSpeculation:
    """The verify route as rounds between two services that share no process or cache:
    ``draft_canvas`` (async, see :data:`models.speculative.DraftCanvas`: a vLLM drafter engine, or a
    :class:`models.drafter.DiffusionDrafter` in a worker thread) and ``verifier`` (a
    :class:`models.speculative.RoundVerifier`: a co-located vLLM engine, or the Verifier deployment
    over a handle). Greedy only: sampled verification redraws from the verifier's whole
    distribution at each draft position, which neither returns."""

    def __init__(self, tokenizer, draft_canvas, verifier, width: int):
        self.tokenizer = tokenizer
        self.draft_canvas = draft_canvas
        self.verifier = verifier
        self.width = width
        self._detok = detokenizer(tokenizer)

    async def _run(self, job: Job, on_tokens=None):
        from models.speculative import speculate_rounds
        from models.verifier import MIN_TEMPERATURE

        if job.temperature >= MIN_TEMPERATURE:
            raise BadRequest("the verify route is greedy only when drafter and verifier run apart: send "
                             "temperature 0 or use another route", param="temperature")
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()
        r = await speculate_rounds(self.verifier, self.draft_canvas, prompt, job.max_tokens, self.width,
                                   self._detok, on_tokens, job.deadline)
        telemetry.record_speculation(job.trace, start, r)
        return prompt, r

    async def speculate(self, job: Job) -> TextResult:
        prompt, r = await self._run(job)
        return speculative_result(prompt, r)

    def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        """One chunk per verification round, sent as the round is accepted."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()
        task = asyncio.ensure_future(self._run(job, on_tokens=queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(done))

        async def rounds():
            try:
                while (ids := await queue.get()) is not done:
                    yield ids
            finally:
                task.cancel()

        def finish(out, text):
            prompt, r = task.result()
            return speculative_result(prompt, r)

        return text_chunks(self.tokenizer, rounds(), finish)


def threaded_draft_canvas(drafter, settings=None):
    """A :class:`models.drafter.DiffusionDrafter`'s ``draft_canvas`` as the async callable
    :class:`RoundSpeculation` takes (the denoising runs in a worker thread)."""

    async def draft_canvas(prefix, first_token, width):
        return await asyncio.to_thread(drafter.draft_canvas, list(prefix), first_token, width, 0, settings)

    return draft_canvas


class LocalDrafter:
    """``DraftService`` over a :class:`models.drafter.DiffusionDrafter`. The verify route is served
    by ``speculative`` (a :class:`models.speculative.SpeculativeDecoder`: verifier in this process,
    sharing the drafter's cache) or by ``rounds`` (a :class:`RoundSpeculation`: verifier elsewhere)."""

    def __init__(self, drafter, speculative=None, grammar=None, rounds: RoundSpeculation | None = None,
                 work: WorkTracker | None = None):
        self.drafter = drafter
        self.work = work or WorkTracker()
        self.tokenizer = drafter.tokenizer
        self.speculative = speculative
        self.rounds = rounds
        self.grammar = grammar  # canvas-aware drafting for constrained jobs when set

    def _hook(self, job: Job):
        c = job.constraint
        return grammar_for(self.grammar, job,
                           lambda: self.grammar.canvas_hook(c.kind, c.spec, self.drafter.canvas_length))

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
        return speculative_result(prompt, r)

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
            return speculative_result(prompt, r)

        return _stream_in_thread(
            self.tokenizer,
            tracked(self.work, job.deadline, lambda emit: self._spec().generate(prompt, job.max_tokens, seed=job.seed, on_tokens=emit,
                                               temperature=job.temperature, deadline=job.deadline)), finish)

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
                           {**draft_stats(d), "batch_size": len(jobs), "canvas_guided": h is not None,
                            **({"expired": True} if d.expired else {})})
                for p, d, h in zip(prompts, drafts, hooks)]

    async def draft_many(self, jobs: Sequence[Job]) -> list[TextResult]:
        jobs = list(jobs)
        return await asyncio.to_thread(tracked(self.work, batch_deadline(jobs), self.draft_many_sync), jobs)

    async def draft(self, job: Job) -> TextResult:
        return (await self.draft_many([job]))[0]

    def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()

        def produce(emit):
            return self.drafter.draft([prompt], max_new_tokens=job.max_tokens, seed=job.seed,
                                      on_canvas=lambda row, idx, new: emit(list(new)), deadlines=[job.deadline])[0]

        def finish(d, ids):
            telemetry.record_draft(job.trace, start, d, 1)
            return TextResult(d.text, len(prompt), len(d.token_ids), d.finished, draft_stats(d))

        return _stream_in_thread(self.tokenizer, tracked(self.work, job.deadline, produce), finish)


class LocalAR:
    """``ARService`` over a :class:`models.verifier.ARVerifier`.

    With a ``grammar`` (:class:`models.grammar.GrammarEngine`), jobs with a constraint the engine
    supports decode under it, valid by construction; ``repair`` continues a draft under the
    grammar from the longest prefix the grammar accepts.
    """

    def __init__(self, verifier, grammar=None, work: WorkTracker | None = None):
        self.verifier = verifier
        self.work = work or WorkTracker()
        self.tokenizer = verifier.tokenizer
        self.grammar = grammar

    def _processor(self, job: Job, prefix: Sequence[int] = ()):
        c = job.constraint
        return grammar_for(self.grammar, job, lambda: self.grammar.processor(c.kind, c.spec, prefix))

    def _run(self, job: Job, prompt: list[int], prefix: list[int], budget: int) -> TextResult:
        processor = self._processor(job, prefix)
        g = self.verifier.generate([prompt + prefix], max_new_tokens=budget, temperature=job.temperature,
                                   logits_processors=[processor], seed=job.seed, deadline=job.deadline)[0]
        ids = prefix + list(g.token_ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return TextResult(text, len(prompt), len(ids), g.finished,
                          {"first_token_s": round(g.first_token_s, 4), "ar_s": round(g.total_s, 4),
                           "constrained": processor is not None, **({"expired": True} if g.expired else {})})

    def generate_sync(self, job: Job) -> TextResult:
        with telemetry.span("ar.generate", job.trace) as sp:
            result = self._run(job, encode_job(self.tokenizer, job), [], job.max_tokens)
            _ar_attributes(sp, result)
            return result

    def repair_sync(self, job: Job, draft_text: str) -> TextResult:
        """Keep the longest draft prefix the grammar accepts; AR continues under the grammar."""
        with telemetry.span("ar.repair", job.trace) as sp:
            prompt = encode_job(self.tokenizer, job)
            c = job.constraint
            ids = self.tokenizer(draft_text, add_special_tokens=False)["input_ids"][: job.max_tokens - 1]
            keep = grammar_for(self.grammar, job, lambda: self.grammar.longest_prefix(c.kind, c.spec, ids))
            if keep is None:  # no grammar for this constraint: answer afresh
                result = self._run(job, prompt, [], job.max_tokens)
            else:
                result = self._run(job, prompt, ids[:keep], job.max_tokens - keep)
                result = TextResult(result.text, result.prompt_tokens, result.completion_tokens, result.finished,
                                    {**result.stats, "repair_reused_tokens": keep, "draft_tokens": len(ids)})
            _ar_attributes(sp, result)
            return result

    async def repair(self, job: Job, draft_text: str) -> TextResult:
        return await asyncio.to_thread(tracked(self.work, job.deadline, self.repair_sync), job, draft_text)

    async def generate(self, job: Job) -> TextResult:
        return await asyncio.to_thread(tracked(self.work, job.deadline, self.generate_sync), job)

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

    def _token_iter(self, job: Job, prompt: list[int]) -> Iterator[int]:
        return self.verifier.stream(prompt, max_new_tokens=job.max_tokens, temperature=job.temperature,
                                    logits_processor=self._processor(job), seed=job.seed, deadline=job.deadline)

    def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        prompt = encode_job(self.tokenizer, job)
        start = telemetry.now_ns()

        def produce(emit):
            n = 0
            for tok in self._token_iter(job, prompt):
                n += 1
                emit([tok])
            return n

        def finish(n, ids):  # fewer tokens than the budget means <eos> ended it
            result = TextResult(self.tokenizer.decode(ids, skip_special_tokens=True), len(prompt), n,
                                n < job.max_tokens, {})
            sp = telemetry.tracer().start_span("ar.stream", context=telemetry.parent(job.trace), start_time=start)
            _ar_attributes(sp, result)
            sp.end()
            return result

        return _stream_in_thread(self.tokenizer, tracked(self.work, job.deadline, produce), finish)


def _ar_attributes(span, result: TextResult) -> None:
    telemetry.attributes(span, {telemetry.GEN_AI_INPUT_TOKENS: result.prompt_tokens,
                                telemetry.GEN_AI_OUTPUT_TOKENS: result.completion_tokens,
                                "dgserve.finished": result.finished})
    telemetry.attributes(span, result.stats, "dgserve.")


class LocalValidator:
    """``ValidationService`` over a :class:`ValidatorRegistry`."""

    def __init__(self, registry: ValidatorRegistry | None = None):
        self.registry = registry or default_registry()

    async def validate(self, constraint, text, trace=None):
        with telemetry.span("validator.validate", trace, attrs={"dgserve.constraint": constraint.kind}) as sp:
            verdict = self.registry.validate(constraint, text)
            telemetry.attributes(sp, {"dgserve.validation.ok": verdict.ok,
                                      "dgserve.validation.errors": len(verdict.errors)})
            if verdict.errors:
                sp.set_attribute("dgserve.validation.first_error", verdict.errors[0][:200])
            return verdict
