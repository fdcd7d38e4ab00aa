"""The verify route across services: draft-and-verify rounds between a drafter and a verifier that
share no process or cache (a vLLM engine, or the Verifier deployment over a handle), and the
:class:`TextResult` of any speculative decode."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Sequence

from models.temperature import is_greedy

from . import telemetry
from .errors import BadRequest
from .interfaces import Job, Stats, TextChunk, TextResult
from .streaming import text_chunks
from .tokens import detokenizer, encode_job


def speculative_result(prompt: Sequence[int], r, tokenizer=None) -> TextResult:
    """The :class:`TextResult` of a finished speculative decode (:class:`models.speculative.SpeculativeResult`);
    with ``tokenizer`` (a watched request) its stats carry each round's text and correction token."""
    stats = Stats(
        drafts=r.drafts, mean_accepted=round(r.mean_accepted, 3), accepted=tuple(r.accepted),
        verifier_forwards=r.verifier_forwards,
        verifier_forwards_per_token=round(r.verifier_forwards / max(1, len(r.token_ids)), 3),
        denoising_steps=r.denoising_steps, verify_s=round(r.total_s, 4))
    if tokenizer is not None:
        texts, at = [], 0
        for n in r.accepted:  # a round's accepted tokens (its <eos>, if any, is not in the output)
            texts.append(tokenizer.decode(list(r.token_ids[at: at + n]), skip_special_tokens=True))
            at += n
        stats.round_texts = tuple(texts)
        stats.round_corrections = tuple("" if c is None else tokenizer.decode([c]) for c in r.corrections)
    return TextResult(r.text, len(prompt), len(r.token_ids), r.finished, stats, tuple(r.token_ids))


async def shadow_agreement(tokenizer, verify, job: Job, answer: TextResult) -> float | None:
    """How much of ``answer`` AR's greedy decoding agrees with: the accepted prefix of one verify
    forward over ``prompt + answer`` (``verify``: a RoundVerifier's, models/acceptance.py's rule)
    divided by the answer's length. None for an empty answer. Example: an answer of 20 tokens whose
    first 15 are AR's greedy choices -> 0.75."""
    ids = (list(answer.token_ids) if answer.token_ids is not None
           else tokenizer(answer.text, add_special_tokens=False)["input_ids"])
    if not ids:
        return None
    verification = await verify(encode_job(tokenizer, job), ids)
    return round(verification.accepted / len(ids), 4)


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
        if not is_greedy(job.temperature):
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
        return speculative_result(prompt, r, self.tokenizer if job.watch else None)

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
            return speculative_result(prompt, r, self.tokenizer if job.watch else None)

        return text_chunks(self.tokenizer, rounds(), finish)


def threaded_draft_canvas(drafter, settings=None):
    """A :class:`models.drafter.DiffusionDrafter`'s ``draft_canvas`` as the async callable
    :class:`RoundSpeculation` takes (the denoising runs in a worker thread)."""

    async def draft_canvas(prefix, first_token, width):
        return await asyncio.to_thread(drafter.draft_canvas, list(prefix), first_token, width, 0, settings)

    return draft_canvas
