"""The environment Ray starts with and the Ingress replicas' own URLs (deployments/data_plane.py)."""

from deployments.data_plane import RAY_ENV, apply, direct_ingress_urls, ray_env


def test_a_value_already_set_wins_over_the_projects():
    env = ray_env({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "PATH": "/bin"})
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and env["RAY_AUTH_MODE"] == "token" and env["PATH"] == "/bin"
    mine = {"RAY_AUTH_MODE": "token"}
    apply(mine)
    assert mine == RAY_ENV
    off = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}
    apply(off)
    assert off["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def _details(host, groups):
    # the shape of GET /api/serve/applications/ (ray.serve.schema.ServeInstanceDetails), trimmed
    return {"http_options": {"host": host, "port": 8000}, "target_groups": groups}


def _group(app, protocol, prefix, *targets):
    return {"app_name": app, "protocol": protocol, "route_prefix": prefix, "ingress_deployment_name": "Ingress",
            "targets": [{"ip": ip, "port": port, "instance_id": "", "name": f"SERVE_REPLICA::{app}#Ingress#{i}"}
                        for i, (ip, port) in enumerate(targets)]}


def test_the_apps_http_targets_at_the_host_its_replicas_bind():
    groups = [_group("dgserve", "HTTP", "/", ("10.0.0.5", 30000), ("10.0.0.6", 30000)),
              _group("dgserve", "gRPC", "/", ("10.0.0.5", 40000)),
              _group("other", "HTTP", "/other", ("10.0.0.5", 30001)),
              _group("", "HTTP", "/", ("10.0.0.5", 8000))]  # a proxy's group (direct ingress off)
    assert direct_ingress_urls(_details("127.0.0.1", groups), "dgserve") == [
        "http://127.0.0.1:30000", "http://127.0.0.1:30000"]
    assert direct_ingress_urls(_details("0.0.0.0", groups), "dgserve") == [
        "http://10.0.0.5:30000", "http://10.0.0.6:30000"]
    assert direct_ingress_urls(_details("0.0.0.0", groups), "other") == ["http://10.0.0.5:30001/other"]
    assert direct_ingress_urls(_details("127.0.0.1", groups[3:]), "dgserve") == []
    assert direct_ingress_urls({"http_options": {"host": "127.0.0.1"}}, "dgserve") == []
