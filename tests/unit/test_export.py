"""models.export_ar writes the causal checkpoint tensor by tensor, in shards, in the asked dtype."""

import json

import torch

from models.export_ar import export
from models.loading import DEFAULT_CHECKPOINT


def test_sharded_export_loads_with_the_same_logits(tmp_path):
    from transformers import Gemma4ForCausalLM

    whole = export(DEFAULT_CHECKPOINT, tmp_path / "whole")
    sharded = export(DEFAULT_CHECKPOINT, tmp_path / "sharded", shard_bytes=1 << 20)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert (whole / "model.safetensors").exists()
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    a = Gemma4ForCausalLM.from_pretrained(str(whole), dtype=torch.float32).eval()
    b = Gemma4ForCausalLM.from_pretrained(str(sharded), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_bf16_export_casts_every_tensor(tmp_path):
    from safetensors import safe_open

    out = export(DEFAULT_CHECKPOINT, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert not any("self_conditioning" in k or "vision" in k for k in f.keys())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["architectures"] == ["Gemma4ForCausalLM"]  # what vLLM picks the model class by
