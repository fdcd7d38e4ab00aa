"""The vLLM engine settings as one typed bundle (what ``models/vllm_backend.py`` builds engines
from). Imports neither torch nor vLLM, so the serve config (``deployments/config.py``) takes its
defaults from here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VLLMSettings:
    model: str  # checkpoint directory (or hub id on a GPU node that has it cached)
    dtype: str = "auto"
    max_model_len: int = 4096
    max_num_seqs: int = 16
    gpu_memory_utilization: float = 0.85
    kv_cache_memory_bytes: int | None = None  # CPU: a small explicit KV cache (e.g. 64 MiB)
    enforce_eager: bool = False
    attention_backend: str | None = None  # DiffusionGemma's recipe: not FlashInfer
    canvas_length: int | None = None  # DiffusionGemma: the served canvas
    max_denoising_steps: int | None = None  # DiffusionGemma: None = the checkpoint's generation_config
    seed: int = 0
    # JSON without free whitespace (engine-wide in vLLM): a weak model can otherwise emit whitespace
    # until max_tokens
    compact_json: bool = True
    # text only: vLLM skips DiffusionGemma's vision tower and multimodal processing (the checkpoint
    # may ship no processor config, and dgserve serves no images)
    language_model_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # further AsyncEngineArgs fields, passed as is

    def engine_args(self):
        from vllm.engine.arg_utils import AsyncEngineArgs

        kw: dict[str, Any] = dict(model=self.model, tokenizer=self.model, dtype=self.dtype,
                                  max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                                  gpu_memory_utilization=self.gpu_memory_utilization,
                                  enforce_eager=self.enforce_eager, seed=self.seed, disable_log_stats=True)
        if self.compact_json:
            from vllm.config import StructuredOutputsConfig

            kw["structured_outputs_config"] = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        if self.kv_cache_memory_bytes is not None:
            kw["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.attention_backend is not None:
            kw["attention_backend"] = self.attention_backend
        if self.language_model_only:
            kw["language_model_only"] = True
        if self.canvas_length is not None:
            diffusion = {"canvas_length": self.canvas_length}
            if self.max_denoising_steps is not None:
                diffusion["max_denoising_steps"] = self.max_denoising_steps
            kw["diffusion_config"] = diffusion
        kw.update(self.extra)
        return AsyncEngineArgs(**kw)
