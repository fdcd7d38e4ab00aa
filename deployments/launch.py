"""``make serve``: ``serve run <config>``, then, once ``/health`` answers, where to go next.

``serve run`` starts a local Ray with :data:`deployments.data_plane.RAY_ENV` (token auth, which
needs a token file: the Makefile makes one; Serve's throughput data plane) and blocks; this wrapper
watches the health endpoint the config names and prints the URL, the docs and one request to try.
Ctrl-C stops the service.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from deployments.data_plane import ray_env


def _read(config: Path) -> tuple[dict, dict]:
    """``config``'s http_options and its first application."""
    doc = yaml.safe_load(config.read_text()) or {}
    return doc.get("http_options") or {}, (doc.get("applications") or [{}])[0]


def endpoint(config: Path) -> tuple[str, str]:
    """(base URL, model name) that ``config`` serves."""
    http, app = _read(config)
    prefix = (app.get("route_prefix") or "/").rstrip("/")
    model = ((app.get("args") or {}).get("model_name")) or "dgserve-tiny"
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix}", model


def playground_enabled(config: Path) -> bool:
    """The config turns the playground page on (``args.playground``)."""
    return bool((_read(config)[1].get("args") or {}).get("playground"))


def banner(url: str, model: str, playground: bool = False) -> str:
    body = json.dumps({"model": model, "max_tokens": 48,
                       "messages": [{"role": "user", "content": "Describe Paris in a few words."}]})
    return "\n".join([
        "",
        f"dgserve is up: {url}",
        f"  API docs    {url}/docs   (OpenAPI: {url}/openapi.json)",
        f"  health      {url}/health",
        *([f"  playground  {url}/playground   (watch a request's canvas denoise)"] if playground else []),
        "  try         curl -s " + f"{url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'",
        "  stop        Ctrl-C",
        "",
    ])


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", nargs="?", default="serve_config.yaml")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    args = ap.parse_args(argv)
    config = Path(args.config)
    url, model = endpoint(config)
    serve_cli = Path(sys.executable).with_name("serve")
    cmd = [str(serve_cli) if serve_cli.exists() else shutil.which("serve") or "serve", "run", str(config)]
    child = subprocess.Popen(cmd, env=ray_env())
    signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGINT))
    try:
        deadline = time.monotonic() + args.ready_timeout_s
        while child.poll() is None and time.monotonic() < deadline:
            if healthy(url):
                print(banner(url, model, playground_enabled(config)), flush=True)
                break
            time.sleep(1)
        else:
            if child.poll() is None:
                print(f"dgserve: {url}/health did not answer within {args.ready_timeout_s:g} s", file=sys.stderr)
        return child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
