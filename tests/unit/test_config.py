from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_committed_serve_configs_parse(name):
    doc = yaml.safe_load((ROOT / name).read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.drafter.max_batch_size >= 1
    if name == "serve_config.yaml":
        assert doc["http_options"]["host"] == "127.0.0.1"
        total = args.drafter.replica.num_cpus + args.validator.replica.num_cpus + args.ingress.num_cpus
        assert total <= 2, "the embedded default must schedule on 2 CPUs"
    else:
        assert args.drafter.replica.num_gpus == 1 and args.drafter.replica.autoscaling
        for model in (args.drafter, args.verifier):  # Ray's queue in front of an engine matches its limits
            seqs = model.vllm.max_num_seqs
            assert model.replica.max_ongoing_requests <= 2 * seqs, model
            assert model.replica.autoscaling["target_ongoing_requests"] <= seqs
        assert args.drafter.batch_size() <= args.drafter.vllm.max_num_seqs
        assert args.router.drafter_queue_threshold <= args.drafter.replica.max_ongoing_requests


def test_unknown_or_wrong_values_fail_at_deploy_time():
    with pytest.raises(ValidationError, match="drafter_queue_treshold"):
        AppArgs.model_validate({"router": {"drafter_queue_treshold": 3}})
    with pytest.raises(ValidationError, match="source"):
        AppArgs.model_validate({"verifier": {"source": "other"}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"limits": {"max_tokens": 0}})
    with pytest.raises(ValidationError, match="grammar_engines"):
        AppArgs.model_validate({"structured": {"grammar_engines": ["outlines"]}})
    with pytest.raises(ValidationError, match="grammar_engines"):
        AppArgs.model_validate({"structured": {"grammar_engines": []}})
    one = AppArgs.model_validate({"structured": {"grammar_engines": ["llguidance"]}})
    assert one.drafter.wiring(one.structured).grammar_engines == ("llguidance",)
    assert AppArgs().drafter.wiring(AppArgs().structured).grammar_engines == ("xgrammar", "llguidance")


def test_vllm_backends_are_checked_at_deploy_time():
    with pytest.raises(ValidationError, match="verifier.source: causal"):
        AppArgs.model_validate({"drafter": {"backend": "vllm"}})
    with pytest.raises(ValidationError, match="checkpoint"):
        AppArgs.model_validate({"verifier": {"source": "causal", "backend": "vllm"}})
    with pytest.raises(ValidationError, match="verifier.backend: vllm"):  # a co-located AR engine
        AppArgs.model_validate({"drafter": {"backend": "vllm", "verify_with": "local"},
                                "verifier": {"source": "causal", "checkpoint": "/m/ar"}})
    with pytest.raises(ValidationError, match="Verifier deployment"):
        AppArgs.model_validate({"drafter": {"verify_with": "verifier"}})
    causal = {"source": "causal", "checkpoint": "/m/ar"}
    assert AppArgs.model_validate({}).verify_mode() == "local"
    assert AppArgs.model_validate({"verifier": causal}).verify_mode() == "local"
    assert AppArgs.model_validate({"drafter": {"backend": "vllm"}, "verifier": causal}).verify_mode() == "verifier"
    assert AppArgs.model_validate({"drafter": {"verify_with": "verifier"}, "verifier": causal}).verify_mode() == "verifier"
    args = AppArgs.model_validate({
        "drafter": {"backend": "vllm", "checkpoint": "/m/dg", "dtype": "bfloat16",
                    "vllm": {"max_num_seqs": 4, "attention_backend": "TRITON_ATTN", "canvas_length": 256,
                             "engine_args": {"enable_prefix_caching": True}}},
        "verifier": {"source": "causal", "backend": "vllm", "checkpoint": "/m/ar"}})
    s = args.drafter.vllm_settings("/unused")
    assert (s.model, s.dtype, s.max_num_seqs, s.canvas_length) == ("/m/dg", "bfloat16", 4, 256)
    assert s.attention_backend == "TRITON_ATTN" and s.extra == {"enable_prefix_caching": True}
    assert s.language_model_only and args.drafter.batch_size() == 4  # defaults to the engine's max_num_seqs
    with pytest.raises(ValidationError, match="max_num_seqs"):
        AppArgs.model_validate({"drafter": {"backend": "vllm", "max_batch_size": 8, "vllm": {"max_num_seqs": 4}},
                                "verifier": causal})
    with pytest.raises(ValidationError, match="disagree"):
        AppArgs.model_validate({"drafter": {"backend": "vllm", "max_denoising_steps": 8,
                                            "vllm": {"max_denoising_steps": 16}}, "verifier": causal})
    steps = AppArgs.model_validate({"drafter": {"backend": "vllm", "max_denoising_steps": 8}, "verifier": causal})
    assert steps.drafter.vllm_settings("/m").max_denoising_steps == 8  # no longer dropped on vLLM
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        AppArgs.model_validate({"drafter": {"vllm": {"gpu_memory_utilization": 1.5}}})


def test_the_ar_batch_kv_layout_reaches_the_wiring_and_unknown_ones_are_refused():
    args = AppArgs.model_validate({"verifier": {"kv_layout": "padded", "max_num_seqs": 12}})
    wiring = args.verifier.wiring(args.structured)
    assert (wiring.ar_kv_layout, wiring.ar_max_num_seqs) == ("padded", 12)
    assert AppArgs().verifier.wiring(AppArgs().structured).ar_kv_layout == "auto"
    with pytest.raises(ValidationError, match="kv_layout"):
        AppArgs.model_validate({"verifier": {"kv_layout": "paged"}})


def test_the_prefix_cache_size_reaches_the_wiring_and_a_negative_one_is_refused():
    args = AppArgs.model_validate({"verifier": {"prefix_cache_tokens": 0}})
    assert args.verifier.wiring(args.structured).ar_prefix_cache_tokens == 0
    assert AppArgs().verifier.wiring(AppArgs().structured).ar_prefix_cache_tokens == 8192
    with pytest.raises(ValidationError, match="prefix_cache_tokens"):
        AppArgs.model_validate({"verifier": {"prefix_cache_tokens": -1}})
