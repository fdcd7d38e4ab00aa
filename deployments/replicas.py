"""The model and validator deployments. Thin: ``__init__`` builds the roles with the one wiring
(``pipeline/assemble.py``) from typed args, and every method forwards."""

from __future__ import annotations

from typing import AsyncIterator

from ray import serve

from pipeline.health import WorkStatus
from pipeline.interfaces import Constraint, Job, TextChunk, TextResult, Verdict
from pipeline.telemetry import configure_tracing

from .config import DrafterArgs, StructuredArgs, ValidatorArgs, VerifierArgs
from .handles import VerifierHandle


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


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
        wiring = args.wiring(structured)
        if args.backend == "vllm":
            self._init_vllm(args, verifier, verifier_handle, wiring)
        else:
            self._init_transformers(args, verifier, verifier_handle, wiring)
        self._draft_batch.set_max_batch_size(args.batch_size())
        self._draft_batch.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    def _init_vllm(self, args: DrafterArgs, verifier: VerifierArgs, handle, wiring) -> None:
        """DiffusionGemma on vLLM. The verify route's rounds are verified by the Verifier
        deployment (``handle``) or, with ``verify_with: local``, by an AR engine built here (the
        Verifier deployment still serves generate/stream/repair)."""
        from models.loading import DEFAULT_CHECKPOINT
        from models.vllm_backend import VLLMCausal, VLLMDiffusion
        from pipeline.assemble import Roles, vllm_drafter_role

        settings = args.vllm_settings(str(DEFAULT_CHECKPOINT))
        engine = VLLMDiffusion.from_settings(settings)
        if handle is not None:
            rounds = VerifierHandle(handle, engine.eos_ids)
        else:  # AppArgs checked that the verifier is a vLLM engine
            rounds = VLLMCausal.from_settings(verifier.vllm_settings(""))
        self.roles = Roles(vllm_drafter_role(engine, _tokenizer(settings.model), rounds, wiring), None)

    def _init_transformers(self, args: DrafterArgs, verifier: VerifierArgs, handle, wiring) -> None:
        """In-process verification: the drafter's own weights (no second copy, one shared cache),
        or the separate causal checkpoint co-located here; with ``handle``, rounds verified by the
        Verifier deployment and no AR model here."""
        from models.drafter import DiffusionDrafter, DraftSettings
        from models.verifier import ARVerifier
        from pipeline.assemble import transformers_roles

        drafter = DiffusionDrafter.from_pretrained(args.checkpoint, args.device, args.dtype)
        if args.max_denoising_steps is not None:
            drafter.settings = DraftSettings(**{**drafter.settings.__dict__, "max_steps": args.max_denoising_steps})
        if handle is not None:
            self.roles = transformers_roles(drafter, None, wiring, VerifierHandle(handle, drafter.eos_ids))
            return
        if verifier.source == "same":  # this replica serves AR: at the verifier's batch size
            ar = ARVerifier.from_diffusion_model(drafter.model, drafter.tokenizer)
            wiring = verifier.ar_batch(wiring)
        else:
            ar = ARVerifier.from_pretrained(verifier.checkpoint, "causal", verifier.device, verifier.dtype)
        self.roles = transformers_roles(drafter, ar, wiring)
        if verifier.source != "same":  # AR is the Verifier deployment's; this copy only verifies
            self.roles.ar = None

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _draft_batch(self, jobs: list[Job]) -> list[TextResult]:
        return await self.roles.drafter.draft_many(jobs)

    async def draft(self, job: Job) -> TextResult:
        return await self._draft_batch(job)

    async def draft_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.roles.drafter.draft_stream(job):
            yield chunk

    async def generate(self, job: Job) -> TextResult:
        return await self._ar().generate(job)

    async def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self._ar().stream(job):
            yield chunk

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        return await self._ar().repair(job, draft)

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        return await self._ar().agreement(job, answer)

    async def speculate(self, job: Job) -> TextResult:
        return await self.roles.drafter.speculate(job)

    async def speculate_stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.roles.drafter.speculate_stream(job):
            yield chunk

    async def status(self) -> WorkStatus:
        """Work in flight and work stuck past its deadline (the ingress' breaker polls this)."""
        return self.roles.work.status()

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica stuck in one step past a request's
        deadline fails it and is replaced."""
        self.roles.work.check()

    def _ar(self):
        if self.roles.ar is None:
            raise RuntimeError("this drafter replica does not serve AR (verifier.source is 'causal')")
        return self.roles.ar


@serve.deployment(name="Verifier")
class VerifierDeployment:
    """A separate causal LM checkpoint for AR generation, streaming and verification."""

    def __init__(self, args: VerifierArgs, structured: StructuredArgs):
        from pipeline.assemble import Roles, transformers_roles

        configure_tracing("verifier")
        _threads(args.torch_threads)
        if args.backend == "vllm":
            from models.vllm_backend import VLLMCausal
            from pipeline.backends.vllm import VLLMAR

            settings = args.vllm_settings("")
            self.roles = Roles(None, VLLMAR(VLLMCausal.from_settings(settings), _tokenizer(settings.model)))
            return
        from models.verifier import ARVerifier

        verifier = ARVerifier.from_pretrained(args.checkpoint, "causal", args.device, args.dtype)
        self.roles = transformers_roles(None, verifier, args.wiring(structured))

    async def generate(self, job: Job) -> TextResult:
        return await self.roles.ar.generate(job)

    async def repair(self, job: Job, draft: TextResult) -> TextResult:
        return await self.roles.ar.repair(job, draft)

    async def agreement(self, job: Job, answer: TextResult) -> float | None:
        return await self.roles.ar.agreement(job, answer)

    async def stream(self, job: Job) -> AsyncIterator[TextChunk]:
        async for chunk in self.roles.ar.stream(job):
            yield chunk

    async def next_token(self, prompt: list[int]) -> int | None:
        """Greedy token after ``prompt`` (a verify round's start, for a Drafter replica)."""
        return await self.roles.ar.next_token(prompt)

    async def verify(self, prompt: list[int], draft: list[int]):
        """One forward over ``prompt + draft``: a :class:`models.acceptance.Verification`."""
        return await self.roles.ar.verify(prompt, draft)

    def check_health(self) -> None:
        self.roles.work.check()


@serve.deployment(name="Validator")
class ValidatorDeployment:
    def __init__(self, args: ValidatorArgs):
        from pipeline.validation import RegistryValidator

        configure_tracing("validator")
        self.validator = RegistryValidator(args.registry())

    async def validate(self, constraint: Constraint, text: str, trace: dict[str, str] | None = None) -> Verdict:
        return await self.validator.validate(constraint, text, trace)
