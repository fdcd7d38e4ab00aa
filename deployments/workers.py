"""Model and validator deployments. Thin: each builds a ``pipeline.local`` object and delegates."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from pipeline.health import WorkStatus, WorkTracker
from pipeline.interfaces import Constraint, Job, TextChunk, TextResult, Verdict
from pipeline.telemetry import configure_tracing

from .config import DrafterArgs, StructuredArgs, ValidatorArgs, VerifierArgs


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _grammar(tokenizer, model, eos_ids, structured: StructuredArgs):
    from models.grammar import GrammarEngine

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    vocab = model.config.get_text_config().vocab_size
    return GrammarEngine(tokenizer, vocab, sorted(eos_ids)[0], pad, structured.grammar_compile_timeout_s)


def _verifier_grammar(verifier, structured: StructuredArgs):
    return _grammar(verifier.tokenizer, verifier.lm.model, verifier.eos_ids, structured)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@serve.deployment(name="Drafter")
class DrafterDeployment:
    """DiffusionGemma drafts; concurrent requests are denoised as one batch (``@serve.batch``).

    With ``verifier.source == "same"`` this replica also serves AR decoding through the same
    weights, so one copy of the weights serves both roles. ``verifier_handle`` (the Verifier
    deployment, when ``drafter.verify_with`` resolves to ``verifier``) verifies the verify route's
    rounds there instead of in this replica.
    """

    def __init__(self, args: DrafterArgs, verifier: VerifierArgs, structured: StructuredArgs,
                 verifier_handle=None):
        configure_tracing("drafter")
        _threads(args.torch_threads)
        self.work = WorkTracker()  # model work in flight, with deadlines (status / check_health)
        if args.backend == "vllm":
            self._init_vllm(args, verifier, verifier_handle)
        else:
            self._init_transformers(args, verifier, structured, verifier_handle)
        self._draft_batch.set_max_batch_size(args.batch_size())
        self._draft_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _init_vllm(self, args: DrafterArgs, verifier: VerifierArgs, handle) -> None:
        """DiffusionGemma on vLLM. The verify route's rounds are verified by the Verifier
        deployment (``handle``) or, with ``verify_with: local``, by an AR engine built here (the
        Verifier deployment still serves generate/stream/repair)."""
        from models.loading import DEFAULT_CHECKPOINT
        from models.vllm_backend import VLLMCausal, VLLMDiffusion
        from pipeline.engines import EngineDrafter

        settings = args.vllm_settings(str(DEFAULT_CHECKPOINT))
        engine = VLLMDiffusion.from_settings(settings)
        if handle is not None:
            ar = VerifierHandle(handle, engine.eos_ids)
        else:  # AppArgs checked that the verifier is a vLLM engine
            ar = VLLMCausal.from_settings(verifier.vllm_settings(""))
        self.local = EngineDrafter(engine, _tokenizer(settings.model), ar, args.verify_draft_width,
                                   args.verify_draft_steps)
        self.ar = None

    def _init_transformers(self, args: DrafterArgs, verifier: VerifierArgs, structured: StructuredArgs,
                           handle) -> None:
        from models.drafter import DiffusionDrafter, DraftSettings
        from models.speculative import SpeculativeDecoder
        from models.verifier import ARVerifier
        from pipeline.local import LocalAR, LocalDrafter, RoundSpeculation, threaded_draft_canvas

        drafter = DiffusionDrafter.from_pretrained(args.checkpoint, args.device, args.dtype)
        if args.max_denoising_steps is not None:
            base = drafter.settings
            drafter.settings = DraftSettings(**{**base.__dict__, "max_steps": args.max_denoising_steps})
        if handle is not None:  # rounds verified by the Verifier deployment: no AR model here
            steps = args.verify_draft_steps
            settings = None if steps is None else DraftSettings(**{**drafter.settings.__dict__, "max_steps": steps})
            rounds = RoundSpeculation(drafter.tokenizer, threaded_draft_canvas(drafter, settings),
                                      VerifierHandle(handle, drafter.eos_ids),
                                      args.verify_draft_width or drafter.canvas_length)
            grammar = _grammar(drafter.tokenizer, drafter.model, drafter.eos_ids, structured)
            self.local = LocalDrafter(drafter, None, grammar if structured.canvas_guidance else None, rounds,
                                      work=self.work)
            self.ar = None
            return
        # In-process verification: the drafter's own weights (no second copy, one shared cache),
        # or the separate causal checkpoint co-located here.
        if verifier.source == "same":
            ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
        else:
            ar = ARVerifier.from_pretrained(verifier.checkpoint, "causal", verifier.device, verifier.dtype)
        grammar = _verifier_grammar(ar, structured)
        self.local = LocalDrafter(drafter, SpeculativeDecoder(drafter, ar, args.verify_draft_steps),
                                  grammar if structured.canvas_guidance else None, work=self.work)
        self.ar = LocalAR(ar, grammar, work=self.work) if verifier.source == "same" else None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _draft_batch(self, jobs: list[Job]) -> list[TextResult]:
        return await self.local.draft_many(jobs)

    async def draft(self, job: Job) -> TextResult:
        return await self._draft_batch(job)

    async def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.local.draft_stream(job):
            yield chunk

    async def generate(self, job: Job) -> TextResult:
        return await self._ar().generate(job)

    async def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self._ar().stream(job):
            yield chunk

    async def repair(self, job: Job, draft_text: str) -> TextResult:
        return await self._ar().repair(job, draft_text)

    async def speculate(self, job: Job) -> TextResult:
        return await self.local.speculate(job)

    async def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.local.speculate_stream(job):
            yield chunk

    async def status(self) -> WorkStatus:
        """Work in flight and work stuck past its deadline (the ingress' breaker polls this)."""
        return self.work.status()

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica stuck in one step past a request's
        deadline fails it and is replaced."""
        self.work.check()

    def _ar(self):
        if self.ar is None:
            raise RuntimeError("this drafter replica does not serve AR (verifier.source is 'causal')")
        return self.ar


@serve.deployment(name="Verifier")
class VerifierDeployment:
    """A separate causal LM checkpoint for AR generation, streaming and verification."""

    def __init__(self, args: VerifierArgs, structured: StructuredArgs):
        from models.verifier import ARVerifier
        from pipeline.local import LocalAR

        configure_tracing("verifier")
        _threads(args.torch_threads)
        self.work = WorkTracker()
        if args.backend == "vllm":
            from models.vllm_backend import VLLMCausal
            from pipeline.engines import EngineAR

            settings = args.vllm_settings("")
            self.ar = EngineAR(VLLMCausal.from_settings(settings), _tokenizer(settings.model))
            return
        verifier = ARVerifier.from_pretrained(args.checkpoint, "causal", args.device, args.dtype)
        self.ar = LocalAR(verifier, _verifier_grammar(verifier, structured), work=self.work)

    async def generate(self, job: Job) -> TextResult:
        return await self.ar.generate(job)

    async def repair(self, job: Job, draft_text: str) -> TextResult:
        return await self.ar.repair(job, draft_text)

    async def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.ar.stream(job):
            yield chunk

    async def next_token(self, prompt: list[int]) -> int | None:
        """Greedy token after ``prompt`` (a verify round's start, for a Drafter replica)."""
        return await self.ar.next_token(prompt)

    async def verify(self, prompt: list[int], draft: list[int]):
        """One forward over ``prompt + draft``: a :class:`models.acceptance.Verification`."""
        return await self.ar.verify(prompt, draft)

    def check_health(self) -> None:
        self.work.check()


@serve.deployment(name="Validator")
class ValidatorDeployment:
    def __init__(self, args: ValidatorArgs):
        from pipeline.local import LocalValidator
        from pipeline.validation import default_registry, load_validator_factory

        configure_tracing("validator")
        factories = {k: load_validator_factory(v) for k, v in args.validators.items()}
        self.local = LocalValidator(default_registry(factories))

    async def validate(self, constraint: Constraint, text: str, trace: dict[str, str] | None = None) -> Verdict:
        return await self.local.validate(constraint, text, trace)


async def _call(method, *args):
    """A handle call; a full replica queue becomes the pipeline's :class:`Overloaded`."""
    from ray.serve.exceptions import BackPressureError

    from pipeline.errors import Overloaded

    try:
        return await method.remote(*args)
    except BackPressureError as e:
        raise Overloaded(f"{method} queue is full", retry_after=1.0) from e


class DraftHandle:
    """``DraftService`` over a Drafter deployment handle."""

    def __init__(self, handle):
        self.handle = handle

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

    async def repair(self, job: Job, draft_text: str) -> TextResult:
        return await _call(self.handle.repair, job, draft_text)


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
