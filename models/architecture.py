"""Tiny DiffusionGemma configurations trained by this project.

The real model is google/diffusiongemma-26B-A4B-it (26B MoE, 3.8B active, canvas 256). The embedded
default keeps its architecture (shared encoder/decoder stack, sliding + full attention with K=V on
full layers, a dense MLP beside a routed MoE block in every layer, tied softcapped head,
self-conditioning block) at a size that trains on two CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

# DiffusionGemma's final-logit softcap (a class attribute there, so absent from its config.json):
# logits -> tanh(logits / SOFTCAP) * SOFTCAP, on the diffusion head and the causal one alike.
SOFTCAP = 30.0


def softcapped(logits):
    """``tanh(logits / SOFTCAP) * SOFTCAP`` in float32 (``logits``: a tensor of any shape)."""
    import torch

    return torch.tanh(logits.float() / SOFTCAP) * SOFTCAP


@dataclass(frozen=True)
class ModelSpec:
    """A DiffusionGemma text stack's sizes (the tiny defaults; ``models/real_shape.py:REAL`` is the
    published 26B-A4B one)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256  # the dense MLP beside the experts
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # sliding-attention layers
    head_dim: int = 32  # sliding-attention layers
    global_head_dim: int = 64  # full-attention layers (K=V)
    num_global_key_value_heads: int | None = None  # full-attention layers; None: num_key_value_heads
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 128
    sliding_window: int = 512
    canvas_length: int = 64
    max_position_embeddings: int = 2048



MICRO = ModelSpec(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                  num_experts=2, top_k_experts=1, moe_intermediate_size=32, canvas_length=16)


def build_config(spec: ModelSpec, layer_types: list[str] | None = None):
    """A ``DiffusionGemmaConfig`` for ``spec`` (with a token-sized vision tower, never used).
    ``layer_types`` defaults to sliding layers and one full-attention layer last."""
    from transformers import DiffusionGemmaConfig

    if layer_types is None:
        layer_types = ["sliding_attention"] * (spec.num_hidden_layers - 1) + ["full_attention"]
    text_config = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        global_head_dim=spec.global_head_dim,
        num_experts=spec.num_experts,
        top_k_experts=spec.top_k_experts,
        moe_intermediate_size=spec.moe_intermediate_size,
        sliding_window=spec.sliding_window,
        layer_types=layer_types,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
    if spec.num_global_key_value_heads is not None:
        text_config["num_global_key_value_heads"] = spec.num_global_key_value_heads
    vision_config = dict(
        model_type="gemma4_vision",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=16,
        global_head_dim=16,
    )
    return DiffusionGemmaConfig(
        text_config=text_config,
        vision_config=vision_config,
        canvas_length=spec.canvas_length,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
    )
