"""`ray start` + `serve deploy serve_config.yaml` exactly as the README says, on 127.0.0.1."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from deployments.data_plane import RAY_ENV
from tests.apps import measured_route

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def cli(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else shutil.which(name)


@pytest.fixture
def ray_head():
    env = {**os.environ, **RAY_ENV}  # the README's `export` line: token auth, the throughput data plane
    subprocess.run([cli("ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
    # as the README says: a machine that never ran Ray has no token file; make one if it is missing
    token = subprocess.run([cli("ray"), "get-auth-token", "--generate"], env=env, capture_output=True,
                           text=True, timeout=120)
    assert token.returncode == 0 and token.stdout.strip(), token.stderr
    start = subprocess.run(
        [cli("ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--dashboard-host", "127.0.0.1", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert start.returncode == 0, start.stdout + start.stderr
    yield env
    subprocess.run([cli("serve"), "shutdown", "-y", "-a", "http://127.0.0.1:8265"], env=env,
                   capture_output=True, timeout=120)
    subprocess.run([cli("ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_serve_deploy_the_committed_config(ray_head):
    env = ray_head
    deploy = subprocess.run([cli("serve"), "deploy", "serve_config.yaml", "-a", "http://127.0.0.1:8265"],
                            env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    status = None
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        out = subprocess.run([cli("serve"), "status", "-a", "http://127.0.0.1:8265"], env=env,
                             capture_output=True, text=True, timeout=120)
        doc = yaml.safe_load(out.stdout) or {}
        status = (doc.get("applications") or {}).get("dgserve", {}).get("status")
        if status in ("RUNNING", "DEPLOY_FAILED"):
            break
        time.sleep(3)
    assert status == "RUNNING", out.stdout
    r = requests.post("http://127.0.0.1:8000/v1/chat/completions", timeout=120, json={
        "model": "dgserve-tiny", "max_tokens": 32,
        "messages": [{"role": "user", "content": "Describe Paris in a few words."}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip()
    measured_route(r.headers["x-route"])  # the committed config calibrates and routes by measurement
