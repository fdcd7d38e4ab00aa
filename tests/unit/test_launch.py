"""`make serve`'s launcher reads the URL and model from the committed config and says where to go."""

from pathlib import Path

from deployments.launch import banner, endpoint, playground_enabled

ROOT = Path(__file__).resolve().parents[2]


def test_endpoint_is_what_the_committed_config_serves():
    url, model = endpoint(ROOT / "serve_config.yaml")
    assert url == "http://127.0.0.1:8000"
    assert model == "dgserve-tiny"


def test_banner_names_the_docs_health_and_a_request_for_the_served_model(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_options: {host: 127.0.0.1, port: 9123}\n"
                   "applications: [{route_prefix: /api, args: {model_name: m1}}]\n")
    url, model = endpoint(cfg)
    text = banner(url, model)
    assert url == "http://127.0.0.1:9123/api"
    assert f"{url}/docs" in text and f"{url}/health" in text
    assert f"{url}/v1/chat/completions" in text and '"model": "m1"' in text
    assert "/playground" not in text and not playground_enabled(cfg)


def test_banner_points_at_the_playground_where_the_config_serves_it():
    url, model = endpoint(ROOT / "serve_config.yaml")
    assert playground_enabled(ROOT / "serve_config.yaml") and not playground_enabled(ROOT / "serve_config.gpu.yaml")
    assert f"{url}/playground" in banner(url, model, True)
