"""The published 26B-A4B shape without downloads: the config counts the published parameters, and
one layer of the real width (V = 262,144, canvas 256) runs the whole pipeline on a CPU: a
grammar-guided draft, validation, repair under the grammar, and verification."""

import asyncio
import gc

import pytest
import torch

from models.real_shape import REAL, layer_types, load_real_shape, real_config

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def test_the_config_is_the_published_shape():
    from transformers import DiffusionGemmaForBlockDiffusion

    assert layer_types(30).count("full_attention") == 5 and layer_types(30)[5] == "full_attention"
    assert layer_types(1) == ["full_attention"] and layer_types(2) == ["sliding_attention", "full_attention"]
    config = real_config(30)
    with torch.device("meta"):
        model = DiffusionGemmaForBlockDiffusion(config)
    model.tie_weights()
    text = {n: p.numel() for n, p in model.named_parameters() if "vision" not in n}
    total = sum(text.values())
    experts = sum(v for n, v in text.items() if ".experts." in n)
    active = total - experts + experts * REAL.top_k_experts // REAL.num_experts
    assert 25.0e9 < total < 25.5e9, total  # ~25.2B
    assert 3.7e9 < active < 4.0e9, active  # ~3.8B active
    t = config.text_config
    assert (t.vocab_size, t.hidden_size, config.canvas_length) == (262_144, 2_816, 256)
    full = t.per_layer_config[5]
    assert (full.head_dim, full.num_key_value_heads) == (512, 2)
    assert (t.per_layer_config[0].head_dim, t.per_layer_config[0].num_key_value_heads) == (256, 8)


@pytest.fixture(scope="module")
def real():
    model, tokenizer = load_real_shape(layers=1, dtype="float32", seed=0)
    yield model, tokenizer
    del model
    gc.collect()


def test_one_real_width_layer_runs_the_whole_pipeline(real):
    from models.drafter import DiffusionDrafter, DraftSettings
    from models.verifier import ARVerifier
    from pipeline.assemble import Wiring, local_pipeline
    from pipeline.interfaces import Constraint, Job, Stats
    from pipeline.router import RouteDecision
    from pipeline.tokens import encode_job

    model, tokenizer = real
    assert len(tokenizer) == REAL.vocab_size
    # random weights never settle: a fixed step count (confidence that is never reached)
    drafter = DiffusionDrafter(model, tokenizer, DraftSettings(max_steps=1, confidence_threshold=-1.0))
    verifier = ARVerifier.from_diffusion_model(model, tokenizer)
    pipe = local_pipeline(drafter, verifier, Wiring(grammar_compile_timeout_s=30, verify_draft_steps=1))
    assert pipe.ar.decoding.grammar.backends[0].first_byte.shape[0] == REAL.vocab_size
    job = Job(messages=(("user", "Is Paris a city? Answer as JSON."),), prompt=None, max_tokens=12,
              constraint=Constraint("json_schema", SCHEMA))
    stats = Stats()
    outcome = asyncio.run(pipe.run(job, RouteDecision("diffusion", "test"), [], stats))
    assert stats.validated is True and stats.canvas_guided is True
    assert stats.denoising_steps == 1 and stats.steps_per_canvas == 1
    assert outcome.result.text in ('{"ok":true}', '{"ok":false}')
    if not stats.draft_valid:
        assert stats.repair_used is True
    # the verify route at the real width: AR's greedy answer, token for token
    prose = Job(messages=(("user", "Describe Paris."),), prompt=None, max_tokens=2)
    spec = asyncio.run(pipe.drafter.speculate(prose))
    want = verifier.generate([encode_job(tokenizer, prose)], max_new_tokens=2)[0]
    assert spec.text == want.text and spec.completion_tokens == len(want.token_ids)
    assert spec.stats.verifier_forwards >= 2
