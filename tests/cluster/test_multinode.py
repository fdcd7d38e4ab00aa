"""The GPU config's shape on a real multi-node Ray cluster, on one machine: placement, node loss
and autoscaling.

``ray.cluster_utils.Cluster`` starts a head and worker nodes, each a real raylet with its own
resources: "GPU nodes" declare a logical GPU (the tiny checkpoint runs on CPU tensors there), CPU
nodes none. The app is ``serve_config.gpu.yaml``'s: a Drafter and a Verifier deployment (a causal
checkpoint exported from the tiny drafter) needing a GPU each, the Ingress and the Validator
needing none. All traffic goes to 127.0.0.1, bounded in count and time.
"""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from deployments.data_plane import apply

apply()
from tests.apps import free_port, served  # noqa: E402

DEADLINE_S = 20
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
          "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    # the head keeps its dashboard (Ray's state API answers through it), on 127.0.0.1
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "dashboard_host": "127.0.0.1"})
    c.add_node(num_cpus=1, num_gpus=0)  # a CPU worker
    gpu = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]  # the Drafter's and the Verifier's
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c, gpu
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def app(cluster, tmp_path_factory):
    from ray import serve

    from models.export_ar import export
    from models.loading import DEFAULT_CHECKPOINT

    ar_dir = export(DEFAULT_CHECKPOINT, tmp_path_factory.mktemp("ar") / "dg-tiny-ar")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    # serve_config.gpu.yaml's shape: one GPU per model replica, the rest CPU-only; a replica takes
    # its GPU node's whole CPU, so nothing else lands there
    args = {
        "drafter": {"device": "cpu", "dtype": "float32", "max_batch_size": 4, "verify_with": "verifier",
                    "replica": {"num_cpus": 1, "num_gpus": 1, "max_ongoing_requests": 8, "max_queued_requests": 16,
                                "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                                "upscale_delay_s": 2, "downscale_delay_s": 6,
                                                "metrics_interval_s": 1, "look_back_period_s": 2}}},
        "verifier": {"source": "causal", "checkpoint": str(ar_dir), "device": "cpu", "dtype": "float32",
                     "replica": {"num_cpus": 1, "num_gpus": 1, "max_ongoing_requests": 16, "max_queued_requests": 16}},
        "validator": {"replica": {"num_cpus": 0.1}},
        # the static rules send structured requests to the drafter (the measured router would send
        # them to AR on this CPU), so that the drafter has work when its node goes
        "router": {"drafter_cooldown_s": 3, "policy": "static"},
        "limits": {"max_tokens": 48, "default_max_tokens": 32, "request_timeout_s": DEADLINE_S, "max_in_flight": 32},
        "ingress": {"num_cpus": 0.1, "max_ongoing_requests": 48, "max_queued_requests": 48},
    }
    with served(args, "dgserve", "/", f"http://127.0.0.1:{port}", 180) as url:
        yield url


def _replicas() -> dict[str, list[str]]:
    """Alive replica actors per deployment -> the node ids they run on (Ray's state API)."""
    from ray.util.state import list_actors

    out: dict[str, list[str]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        if a.class_name.startswith("ServeReplica:dgserve:"):
            out.setdefault(a.class_name.rsplit(":", 1)[1], []).append(a.node_id)
    return out


def _gpu_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0}


def _structured(i: int) -> dict:
    return {"model": "dgserve-tiny", "max_tokens": 40, "messages": [{"role": "user", "content": f"Name city {i} as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": SCHEMA}}}


def _post(url: str, body: dict):
    t = time.monotonic()
    try:
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S + 10,
                          headers={"x-request-timeout-seconds": str(DEADLINE_S)})
    except requests.RequestException as e:
        return e, time.monotonic() - t
    return r, time.monotonic() - t


def _load(url: str, clients: int, seconds: float, during=None) -> list:
    """Closed-loop clients for ``seconds``; ``during()`` runs once, a third of the way in."""
    results, lock = [], threading.Lock()
    stop = time.monotonic() + seconds

    def loop(k):
        i = 0
        while time.monotonic() < stop:
            r, took = _post(url, _structured(k * 1000 + i))
            with lock:
                results.append((r, took, time.monotonic()))
            i += 1

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(loop, k) for k in range(clients)]
        if during is not None:
            time.sleep(seconds / 3)
            during()
        for f in futures:
            f.result()
    return results


def test_model_replicas_run_on_gpu_nodes_and_the_rest_on_cpu_nodes(app):
    placed, gpu = _replicas(), _gpu_nodes()
    assert set(placed) >= {"Drafter", "Verifier", "Validator", "Ingress"}, placed
    for name in ("Drafter", "Verifier"):
        assert placed[name] and all(n in gpu for n in placed[name]), (name, placed)
    for name in ("Ingress", "Validator"):
        assert placed[name] and not any(n in gpu for n in placed[name]), (name, placed)
    assert set(placed["Drafter"]).isdisjoint(placed["Verifier"])  # one GPU each
    r, _ = _post(app, _structured(0))
    assert r.status_code == 200 and r.json()["route"]["path"] == "diffusion", r.text


def test_losing_the_drafters_node_loses_no_accepted_request(app, cluster):
    c, gpu_nodes = cluster
    drafter_node = _replicas()["Drafter"][0]
    node = next(n for n in c.worker_nodes if n.node_id == drafter_node)
    killed: dict = {}

    def kill():
        killed["at"] = time.monotonic()
        c.remove_node(node, allow_graceful=False)
        c.add_node(num_cpus=1, num_gpus=1)  # the replacement node (a cloud autoscaler's job)

    results = _load(app, clients=4, seconds=12, during=kill)
    after = [(r, took) for r, took, t in results if t >= killed["at"]]
    ok = [r for r, _, _ in results if getattr(r, "status_code", 0) == 200]
    assert len(after) >= 8, "too little traffic after the node loss to judge"
    assert len(ok) == len(results), [(getattr(r, "status_code", r), getattr(r, "text", "")[:200])
                                     for r, _, _ in results if getattr(r, "status_code", 0) != 200]
    slowest = max(took for _, took, _ in results)
    assert slowest < DEADLINE_S + 2
    paths = [r.json()["route"]["path"] for r, _ in after if getattr(r, "status_code", 0) == 200]
    assert "ar" in paths  # served by the Verifier deployment's AR while the drafter was out

    # Ray Serve reschedules the replica on the new GPU node; the drafter comes back into rotation
    deadline = time.monotonic() + 180
    back_s = None
    while time.monotonic() < deadline:
        r, _ = _post(app, _structured(7))
        if getattr(r, "status_code", 0) == 200 and r.json()["route"]["path"] == "diffusion":
            back_s = time.monotonic() - killed["at"]
            break
        time.sleep(1)
    assert back_s is not None, "the drafter did not come back into rotation"
    assert all(n in _gpu_nodes() for n in _replicas()["Drafter"])
    print(f"node loss: {len(results)} requests, {len(after)} after the loss, all answered "
          f"({paths.count('ar')} of them by AR); slowest {slowest:.1f} s; drafter back after {back_s:.1f} s")


def test_a_burst_scales_the_drafter_up_and_the_quiet_scales_it_down(app, cluster):
    c, _ = cluster
    c.add_node(num_cpus=1, num_gpus=1)  # room for a second Drafter replica
    assert len(_replicas()["Drafter"]) == 1
    peak = {"n": 1, "at": None}
    started = time.monotonic()

    def watch():
        end = time.monotonic() + 40
        while time.monotonic() < end and peak["n"] < 2:
            peak["n"] = max(peak["n"], len(_replicas().get("Drafter", [])))
            time.sleep(1)
        peak["at"] = time.monotonic() - started

    watcher = threading.Thread(target=watch)
    watcher.start()
    results = _load(app, clients=6, seconds=25)
    watcher.join()
    up_s = peak["at"]
    assert all(getattr(r, "status_code", 0) == 200 for r, _, _ in results)
    assert peak["n"] == 2, "the burst did not scale the drafter up"
    assert all(n in _gpu_nodes() for n in _replicas()["Drafter"])
    quiet = time.monotonic()
    deadline = quiet + 90
    while time.monotonic() < deadline and len(_replicas().get("Drafter", [])) > 1:
        time.sleep(2)
    assert len(_replicas()["Drafter"]) == 1, "the quiet did not scale the drafter down"
    print(f"autoscaling: {len(results)} requests by 6 clients, all 200; 2 Drafter replicas within "
          f"{up_s:.0f} s of the burst, back to 1 {time.monotonic() - quiet:.0f} s into the quiet")
