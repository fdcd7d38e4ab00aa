"""DiffusionGemma at the published 26B-A4B shape, random weights, built from its config (no download).

The shape (transformers' DiffusionGemma conversion script for ``google/diffusiongemma-26B-A4B-it``):
vocabulary 262,144; hidden 2,816; 30 layers, 5 sliding : 1 full; 16 query heads; sliding layers
8 KV heads of head_dim 256, full layers 2 KV heads of head_dim 512 with K=V; a dense MLP of 2,112
beside 128 experts (top-8, 704 each); sliding window 1,024; canvas 256; softcap 30. ~25.2B
parameters, 3.8B active.

``layers`` keeps the width and cuts the depth (one layer of the real width is ~1.55B parameters,
6.2 GB in float32: it runs the whole pipeline on a CPU). Below 6 layers the last one is a full
attention layer, so every depth has both kinds from 2 layers on. The tokenizer is the committed
byte-level BPE padded to 262,144 entries with special tokens no text produces
(``<unused1024>``...), so the grammar engine, the sampler kernels and the bitmasks see the real
vocabulary. Random weights never converge: every canvas runs to its step cap.

Run: ``python -m models.real_shape --layers 1 --out /tmp/dg-real-1l [--config-only]`` (config-only:
config, generation config and tokenizer, for vLLM's ``load_format="dummy"``).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from .architecture import ModelSpec, build_config
from .tokenizer import BOS_ID, EOS_ID, PAD_ID

REAL = ModelSpec(vocab_size=262_144, hidden_size=2_816, intermediate_size=2_112, num_hidden_layers=30,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
                 num_global_key_value_heads=2, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
                 sliding_window=1_024, canvas_length=256, max_position_embeddings=262_144)


def layer_types(layers: int) -> list[str]:
    """5 sliding : 1 full, as published; below 6 layers the last layer is the full one."""
    kinds = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(layers)]
    if layers < 6:
        kinds[-1] = "full_attention"
    return kinds


def real_config(layers: int = REAL.num_hidden_layers, shape: ModelSpec = REAL):
    """A ``DiffusionGemmaConfig`` of ``shape`` with ``layers`` layers."""
    if layers < 1:
        raise ValueError("layers must be at least 1")
    return build_config(replace(shape, num_hidden_layers=layers), layer_types(layers))


def real_generation_config(max_new_tokens: int = 1024):
    """The published sampler settings: 48 steps, entropy bound 0.1, t 0.4-0.8, stability 1,
    confidence 0.005."""
    from transformers import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSamplerConfig,
    )

    return DiffusionGemmaGenerationConfig(
        max_new_tokens=max_new_tokens, max_denoising_steps=48,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1), t_min=0.4, t_max=0.8,
        stability_threshold=1, confidence_threshold=0.005, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        bos_token_id=BOS_ID)


def write_padded_tokenizer(out: Path, vocab_size: int = REAL.vocab_size, source: Path | None = None) -> Path:
    """The committed tokenizer with special tokens ``<unusedN>`` up to ``vocab_size`` entries."""
    from .loading import DEFAULT_CHECKPOINT

    src = Path(source or DEFAULT_CHECKPOINT)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    doc = json.loads((src / "tokenizer.json").read_text())
    used = max([*doc["model"]["vocab"].values(), *(t["id"] for t in doc["added_tokens"])]) + 1
    doc["added_tokens"] += [{"id": i, "content": f"<unused{i}>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True} for i in range(used, vocab_size)]
    (out / "tokenizer.json").write_text(json.dumps(doc))
    return out


def build_model(layers: int = 1, dtype: str = "float32", seed: int = 0, shape: ModelSpec = REAL, device: str = "cpu"):
    """A randomly initialised ``DiffusionGemmaForBlockDiffusion`` of ``shape`` on ``device``, in eval mode."""
    import torch
    from transformers import DiffusionGemmaForBlockDiffusion

    from .loading import resolve_dtype

    config = real_config(layers, shape)
    config.text_config._attn_implementation = "sdpa"
    # Built on the meta device, then transformers' own initialisation fills it module by module
    # (parameters and the computed buffers: rotary frequencies, embedding scales): one copy of the
    # weights in memory at a time (the plain constructor peaks at twice the model).
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    model = model.to_empty(device=device)
    model.tie_weights()  # the encoder, decoder and head share one stack (to_empty gave each its own)
    torch.manual_seed(seed)
    model.init_weights()
    for name, buf in model.named_buffers():  # init_weights visits a shared layer once: its twin's scalar too
        if name.endswith("layer_scalar"):
            buf.fill_(1.0)
    model = model.to(resolve_dtype(dtype))
    model.generation_config = real_generation_config()
    model.eval()
    return model


def write_checkpoint(out: Path, layers: int = 1, dtype: str = "bfloat16", seed: int = 0,
                     config_only: bool = False, shape: ModelSpec = REAL) -> Path:
    """A checkpoint directory of ``shape``: config, generation config, padded tokenizer and,
    unless ``config_only``, random weights."""
    out = Path(out)
    write_padded_tokenizer(out, shape.vocab_size)
    if config_only:
        config = real_config(layers, shape)
        config.save_pretrained(out)
        real_generation_config().save_pretrained(out)
        return out
    model = build_model(layers, dtype, seed, shape)
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_real_shape(layers: int = 1, dtype: str = "float32", seed: int = 0, tokenizer_dir: Path | None = None,
                    shape: ModelSpec = REAL, device: str = "cpu"):
    """(model, tokenizer) at ``shape`` (the real one by default), built in memory (the tokenizer is
    written to ``tokenizer_dir``, a temporary directory when None)."""
    import tempfile

    from transformers import AutoTokenizer

    where = Path(tokenizer_dir or tempfile.mkdtemp(prefix="dg-real-tok-"))
    tokenizer = AutoTokenizer.from_pretrained(str(write_padded_tokenizer(where, shape.vocab_size)))
    return build_model(layers, dtype, seed, shape, device), tokenizer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true", help="no weights (for vLLM load_format=dummy)")
    a = ap.parse_args(argv)
    print(write_checkpoint(a.out, a.layers, a.dtype, a.seed, a.config_only))


if __name__ == "__main__":
    main()
