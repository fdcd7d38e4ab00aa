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


def test_unknown_or_wrong_values_fail_at_deploy_time():
    with pytest.raises(ValidationError, match="drafter_queue_treshold"):
        AppArgs.model_validate({"router": {"drafter_queue_treshold": 3}})
    with pytest.raises(ValidationError, match="source"):
        AppArgs.model_validate({"verifier": {"source": "other"}})
    with pytest.raises(ValidationError):
        AppArgs.model_validate({"limits": {"max_tokens": 0}})
