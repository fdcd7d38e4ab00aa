"""The KubeRay manifest (deploy/kuberay/rayservice.gpu.yaml) stays in step with serve_config.gpu.yaml
and gives every deployment of it a place to run: GPU replicas on GPU pods only, the head free of
model replicas, a Collector where the traces are sent, the Ray version this package pins
(read from pyproject.toml: the vLLM job runs this suite without Ray)."""

import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

from deployments.config import AppArgs

ROOT = Path(__file__).resolve().parents[2]


def _manifest():
    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.gpu.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    collector = next(d for d in docs if d["kind"] == "ConfigMap")
    return service, collector


def test_the_rayservice_serves_the_gpu_serve_config():
    service, _ = _manifest()
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert embedded == yaml.safe_load((ROOT / "serve_config.gpu.yaml").read_text())
    cluster = service["spec"]["rayClusterConfig"]
    pinned = re.search(r'"ray\[serve\]==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert cluster["rayVersion"] == pinned
    assert cluster["authOptions"]["mode"] == "token"  # as RAY_AUTH_MODE=token everywhere else


def test_every_deployment_has_pods_to_run_on():
    service, collector = _manifest()
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    args = AppArgs.model_validate(app["args"])
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # no model replica on the head

    def pod_resources(group):
        main = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        return float(main["cpu"]), int(main.get("nvidia.com/gpu", 0)), int(group["rayStartParams"].get("num-gpus", "0"))

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values() if pod_resources(g)[1] > 0]
    assert gpu_groups, "no GPU worker group"
    for g in groups.values():
        cpus, gpus, ray_gpus = pod_resources(g)
        assert gpus == ray_gpus  # Ray schedules on the GPUs the pod really has
    gpu_models = [m for m in (args.drafter, args.verifier) if m.replica.num_gpus > 0]
    assert gpu_models
    for m in gpu_models:
        fits = [g for g in gpu_groups if pod_resources(g)[1] >= m.replica.num_gpus and
                pod_resources(g)[0] >= m.replica.num_cpus]
        assert fits, f"no GPU pod holds a replica needing {m.replica.num_gpus} GPU, {m.replica.num_cpus} CPU"
    most = sum(m.replica.autoscaling["max_replicas"] * m.replica.num_gpus for m in gpu_models)
    assert sum(g["maxReplicas"] * pod_resources(g)[1] for g in gpu_groups) >= most
    assert sum(g["minReplicas"] * pod_resources(g)[1] for g in gpu_groups) >= sum(
        m.replica.autoscaling["min_replicas"] * m.replica.num_gpus for m in gpu_models)
    # traces go to a Collector beside Ray in every pod, on the port the serve config names
    endpoint = urlparse(app["runtime_env"]["env_vars"]["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
    assert endpoint.hostname == "127.0.0.1"
    for spec in [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups.values()]:
        sidecars = [c for c in spec["containers"] if c["name"] == "otel-collector"]
        assert sidecars and endpoint.port in [p["containerPort"] for p in sidecars[0]["ports"]]
        assert {v["name"] for v in spec["volumes"]} >= {"otel-config"}
    receiver = yaml.safe_load(collector["data"]["config.yaml"])["receivers"]["otlp"]["protocols"]["http"]
    assert receiver["endpoint"] == f"{endpoint.hostname}:{endpoint.port}"
