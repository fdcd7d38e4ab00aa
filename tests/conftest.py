import os

import pytest
import torch

from deployments.data_plane import apply as apply_ray_env
from tests.apps import API_KEY, free_port, wait_until_healthy

apply_ray_env()  # the Ray the suites start runs as `make serve` runs it

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(session, config, items):
    """The browser suite runs last: it drives the real app the integration suite started (one app
    per session; the cluster suite, which runs between them alphabetically, restarts Ray)."""
    items.sort(key=lambda item: "tests/browser/" in item.nodeid.replace("\\", "/"))


@pytest.fixture(scope="session")
def tiny():
    """The committed tiny checkpoint as an AR verifier (through its causal encoder)."""
    from models.verifier import ARVerifier

    return ARVerifier.from_pretrained(None, "diffusion", "cpu")


@pytest.fixture(scope="session")
def dg():
    """The committed tiny DiffusionGemma checkpoint: (model, tokenizer)."""
    from models.loading import load_diffusion_model

    return load_diffusion_model(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def drafter(dg):
    from models.drafter import DiffusionDrafter

    return DiffusionDrafter(*dg)


@pytest.fixture(scope="session")
def verifier(dg):
    from models.verifier import ARVerifier

    return ARVerifier.from_diffusion_model(*dg)


# -- the real application under ``serve.run`` (real tiny checkpoints), on 127.0.0.1 only ----------


@pytest.fixture(scope="session")
def otlp():
    """Every replica of the app exports its spans here over OTLP/HTTP (protobuf)."""
    from tests.otlp_receiver import OTLPReceiver

    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def metrics_url():
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="session")
def ray_cluster(otlp, metrics_url):
    import ray

    # The standard OTel SDK variables, as serve_config.yaml's runtime_env.env_vars would set them.
    otel = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": otlp.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "dgserve", "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "200"}
    otel["DGSERVE_TEST_API_KEY"] = API_KEY  # the guarded app (test_reliability.py) reads its key from here
    port = int(metrics_url.rsplit(":", 1)[1].split("/")[0])
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": otel}, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def app_url(ray_cluster):
    from ray import serve

    from deployments.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # a 20 ms batching window makes concurrent requests meet in one denoising batch deterministically
    # the second model of serve_config.yaml: the Sudoku checkpoint, routed by the static rules
    sudoku = {"name": "dgserve-sudoku", "router": {"policy": "static"},
              "drafter": {"checkpoint": "dg-sudoku", "device": "cpu", "dtype": "float32",
                          "replica": {"num_cpus": 0.3, "max_ongoing_requests": 16}}}
    args = {"drafter": {"device": "cpu", "dtype": "float32", "batch_wait_timeout_s": 0.02},
            "limits": {"max_tokens": 256, "default_max_tokens": 128}, "models": [sudoku], "playground": True}
    serve.run(build_app(args), name="dgserve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 60)
    yield url
    serve.delete("dgserve")
    serve.shutdown()


@pytest.fixture(scope="session")
def client(app_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=120)
