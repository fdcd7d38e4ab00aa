"""The one place that picks devices and dtypes and loads checkpoints. Nothing loads at import."""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "dg-tiny"
DEFAULT_AR_CHECKPOINT = CHECKPOINTS / "dg-tiny-ar"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` means bfloat16 on CUDA and float32 on CPU (bf16 is slower on CPUs without AMX)."""
    if dtype == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def resolve_checkpoint(path: str | Path | None) -> Path | str:
    """A local directory, or a hub id passed through for production (``google/...``)."""
    if path is None:
        return DEFAULT_CHECKPOINT
    p = Path(path)
    if p.exists():
        return p
    if not p.is_absolute() and (CHECKPOINTS / p).exists():
        return CHECKPOINTS / p
    return str(path)


def eos_ids(model, tokenizer) -> frozenset[int]:
    """The ids that end an answer: the generation config's ``eos_token_id`` (an id or a list), else
    the tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else eos)


def left_padded(prompts, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of token-id ``prompts`` padded on the left, so every row's answer starts at the same
    position: (ids [batch, width] long, mask [batch, width] bool, True on real tokens), ``width``
    the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def load_diffusion_model(path: str | Path | None = None, device: str = "auto", dtype: str = "auto"):
    """Load a ``DiffusionGemmaForBlockDiffusion`` and its tokenizer, in eval mode."""
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

    ckpt = resolve_checkpoint(path)
    dev = resolve_device(device)
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(
        str(ckpt), dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa"
    ).to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    return model, tokenizer


def load_causal_model(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """Load a separate transformers causal LM checkpoint and its tokenizer, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = resolve_checkpoint(path)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        str(ckpt), dtype=resolve_dtype(dtype, dev), attn_implementation="sdpa"
    ).to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
    return model, tokenizer
