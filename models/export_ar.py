"""Export a DiffusionGemma checkpoint's text weights as a ``Gemma4ForCausalLM`` checkpoint.

The causal encoder of DiffusionGemma is a Gemma 4 text model (K=V on full-attention layers, a MoE
block beside the dense MLP, softcap 30). Loaded as ``Gemma4ForCausalLM`` it gives the same logits
as the encoder + tied head, so it serves as the "separate causal LM" verifier weight source and as
the AR checkpoint for engines that do not know DiffusionGemma (vLLM's AR path).

Run: ``python -m models.export_ar --src models/checkpoints/dg-tiny --out models/checkpoints/dg-tiny-ar``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def gemma4_text_config(dg_config):
    from transformers import Gemma4TextConfig

    t = dg_config.text_config
    full = next(i for i, kind in enumerate(t.layer_types) if kind == "full_attention")
    local = next((i for i, kind in enumerate(t.layer_types) if kind == "sliding_attention"), full)
    layers = t.per_layer_config  # head sizes differ between sliding and full layers
    return Gemma4TextConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=layers[local].num_key_value_heads,
        head_dim=layers[local].head_dim,
        global_head_dim=layers[full].head_dim,
        hidden_activation=t.hidden_activation,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        pad_token_id=t.pad_token_id,
        eos_token_id=t.eos_token_id,
        bos_token_id=t.bos_token_id,
        tie_word_embeddings=True,
        rope_parameters=t.rope_parameters,
        sliding_window=t.sliding_window,
        layer_types=list(t.layer_types),
        final_logit_softcapping=30.0,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=t.num_experts,
        top_k_experts=t.top_k_experts,
        moe_intermediate_size=t.moe_intermediate_size,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
    )


def export(src: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion, Gemma4ForCausalLM, GenerationConfig

    dg = DiffusionGemmaForBlockDiffusion.from_pretrained(str(src), dtype=torch.float32)
    causal = Gemma4ForCausalLM(gemma4_text_config(dg.config))
    source = {f"model.{k}": v for k, v in dg.model.decoder.state_dict().items()
              if not k.startswith("self_conditioning.")}
    missing, unexpected = causal.load_state_dict(source, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing={missing} unexpected={unexpected}")
    causal.tie_weights()
    eos, pad = dg.generation_config.eos_token_id, dg.generation_config.pad_token_id
    causal.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=2)
    out.mkdir(parents=True, exist_ok=True)
    causal.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    print(export(a.src, a.out))


if __name__ == "__main__":
    main()
