"""Export a DiffusionGemma checkpoint's text weights as a ``Gemma4ForCausalLM`` checkpoint.

The causal encoder of DiffusionGemma is a Gemma 4 text model (K=V on full-attention layers, a MoE
block beside the dense MLP, softcap 30). Loaded as ``Gemma4ForCausalLM`` it gives the same logits
as the encoder + tied head, so it serves as the "separate causal LM" verifier weight source and as
the AR checkpoint for engines that do not know DiffusionGemma (vLLM's AR path).

Run: ``python -m models.export_ar --src models/checkpoints/dg-tiny --out models/checkpoints/dg-tiny-ar``
(the 26B model: ``--dtype bfloat16``; the peak memory is one output shard, ``--shard-gb``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .architecture import SOFTCAP


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
        final_logit_softcapping=SOFTCAP,
        attention_k_eq_v=True,
        enable_moe_block=True,
        num_experts=t.num_experts,
        top_k_experts=t.top_k_experts,
        moe_intermediate_size=t.moe_intermediate_size,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
    )


_DROP = ("self_conditioning.",)  # the decoder's self-conditioning block has no place in an AR model


def _source_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        return [src / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [src / "model.safetensors"]


def _causal_name(key: str) -> str | None:
    """The ``Gemma4ForCausalLM`` name of a DiffusionGemma checkpoint tensor, or None when the AR
    model has no use for it (the vision tower, self-conditioning, the encoder's tied copies)."""
    prefix = "model.decoder."
    if not key.startswith(prefix) or key[len(prefix):].startswith(_DROP):
        return None
    return "model." + key[len(prefix):]


def export(src: Path, out: Path, dtype: str = "auto", shard_bytes: int = 4 << 30) -> Path:
    """Write ``src``'s text weights as a ``Gemma4ForCausalLM`` checkpoint at ``out``.

    Tensor by tensor: each one is read from the source shards (memory-mapped), cast to ``dtype``
    (``auto``: as stored; ``bfloat16`` for the 26B model) and written into output shards of at most
    ``shard_bytes``, so the peak memory is about one output shard, not the model (the 26B model in
    float32 twice over was ~200 GB). The names must be what ``Gemma4ForCausalLM`` expects; a
    checkpoint stored otherwise (a different layout than transformers writes) is refused with the
    names that do not match."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        Gemma4ForCausalLM,
        GenerationConfig,
    )

    src, out = Path(src), Path(out)
    config = gemma4_text_config(AutoConfig.from_pretrained(str(src)))
    with torch.device("meta"):
        expected = {k for k in Gemma4ForCausalLM(config).state_dict() if k != "lm_head.weight"}
    cast = None if dtype == "auto" else {"bfloat16": torch.bfloat16, "float32": torch.float32,
                                         "float16": torch.float16}[dtype]
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    size, written, weight_map = 0, set(), {}
    files: list[str] = []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for path in _source_files(src):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = _causal_name(key)
                if name is None:
                    continue
                if name not in expected:
                    raise RuntimeError(f"{path.name}: {key} has no Gemma4ForCausalLM counterpart ({name})")
                t = f.get_tensor(key)
                t = (t if cast is None else t.to(cast)).contiguous()
                if size and size + t.numel() * t.element_size() > shard_bytes:
                    flush()
                shard[name] = t
                size += t.numel() * t.element_size()
                written.add(name)
    flush()
    missing = sorted(expected - written)
    if missing:
        raise RuntimeError(f"weights missing from {src}: {missing[:8]}")
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
    else:
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config.architectures = ["Gemma4ForCausalLM"]  # what engines (vLLM) read to pick the model class
    config.dtype = dtype if cast is not None else str(config.dtype or "float32").removeprefix("torch.")
    config.save_pretrained(out)
    gen = GenerationConfig.from_pretrained(str(src))
    GenerationConfig(eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id,
                     bos_token_id=gen.bos_token_id).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    p.add_argument("--shard-gb", type=float, default=4.0)
    a = p.parse_args(argv)
    print(export(a.src, a.out, a.dtype, int(a.shard_gb * 2**30)))


if __name__ == "__main__":
    main()
