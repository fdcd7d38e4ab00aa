"""What the suites that serve a real app share."""

import socket
import time
from contextlib import contextmanager

API_KEY = "sk-test-0123456789"  # the guarded test app's key (tests/integration/test_reliability.py)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(url: str, timeout_s: float) -> None:
    """Poll ``url``/health until it answers 200 (a fresh deployment takes a few seconds)."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:g} s")


@contextmanager
def served(args: dict, name: str, route_prefix: str, url: str, timeout_s: float):
    """The app built from ``args`` under ``serve.run`` as ``name`` at ``route_prefix``, answering
    ``url``/health; deleted afterwards."""
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(args), name=name, route_prefix=route_prefix)
    try:
        wait_until_healthy(url, timeout_s)
        yield url
    finally:
        serve.delete(name)


def measured_route(header: str) -> tuple[str, dict[str, float]]:
    """An ``x-route`` header of the measured router -> (path, predicted ms per path), checking that
    the path taken is the one predicted soonest, or one sent to explore (a share of decisions, so
    that an estimate once too high can come down). Example: ``ar; reason=predicted 209 ms vs verify
    249 ms (calibrated, 0 in flight); diffusion agreement 0.42 < 0.8`` -> ("ar", {"ar": 209, "verify": 249})."""
    import re

    m = re.match(r"(ar|diffusion|verify); reason=(?:exploring (\w+) \(last measured \d+ decisions ago\); )?"
                 r"predicted (\d+) ms((?: vs \w+ \d+ ms)*) \((calibrated|measured), \d+ in flight\)", header)
    assert m, f"not a measured route: {header!r}"
    path, explored = m.group(1), m.group(2)
    predicted = {p: float(ms) for p, ms in re.findall(r" vs (\w+) (\d+) ms", m.group(4))}
    best = float(m.group(3))
    assert best <= min(predicted.values(), default=best), header
    if explored is None:
        predicted[path] = best
    else:
        assert explored == path and path in predicted, header
    return path, predicted
