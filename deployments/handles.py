"""Ray-handle implementations of the pipeline's role Protocols: what the ingress (and a Drafter
replica verifying elsewhere) calls. A full replica queue becomes the pipeline's ``Overloaded``."""

from __future__ import annotations

from typing import AsyncIterator

from pipeline.health import WorkStatus
from pipeline.interfaces import Constraint, Job, TextChunk, TextResult, Verdict


async def _call(method, *args):
    """A handle call; a full replica queue becomes the pipeline's :class:`Overloaded`."""
    from ray.serve.exceptions import BackPressureError

    from pipeline.errors import Overloaded

    try:
        return await method.remote(*args)
    except BackPressureError as e:
        raise Overloaded(f"{method} queue is full", retry_after=1.0) from e


class DraftHandle:
    """``DraftService`` over a Drafter deployment handle; ``sampled_verify`` is what the replica's
    wiring gives (``AppArgs.sampled_verify``)."""

    def __init__(self, handle, sampled_verify: bool):
        self.handle = handle
        self.sampled_verify = sampled_verify

    async def draft(self, job: Job) -> TextResult:
        return await _call(self.handle.draft, job)

    async def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.handle.options(stream=True).draft_stream.remote(job):
            yield chunk

    async def speculate(self, job: Job) -> TextResult:
        return await _call(self.handle.speculate, job)

    async def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.handle.options(stream=True).speculate_stream.remote(job):
            yield chunk

    async def status(self) -> WorkStatus:
        return await self.handle.status.remote()


class ARHandle:
    """``ARService`` over a Drafter (same weights) or Verifier deployment handle."""

    def __init__(self, handle):
        self.handle = handle

    async def generate(self, job: Job) -> TextResult:
        return await _call(self.handle.generate, job)

    async def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.handle.options(stream=True).stream.remote(job):
            yield chunk

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        return await _call(self.handle.repair, job, draft)

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        return await _call(self.handle.agreement, job, answer)


class VerifierHandle:
    """A :class:`models.speculative.RoundVerifier` over a Verifier deployment handle: one call per
    verify round. ``eos_ids`` are the drafter's (drafter and verifier share one tokenizer)."""

    def __init__(self, handle, eos_ids):
        self.handle = handle
        self.eos_ids = frozenset(eos_ids)

    async def next_token(self, prompt) -> int | None:
        return await _call(self.handle.next_token, list(prompt))

    async def verify(self, prompt, draft):
        return await _call(self.handle.verify, list(prompt), list(draft))


class ValidatorHandle:
    def __init__(self, handle):
        self.handle = handle

    async def validate(self, constraint: Constraint, text: str, trace: dict[str, str] | None = None) -> Verdict:
        return await _call(self.handle.validate, constraint, text, trace)
