"""What the suites that serve a real app share."""

import time

API_KEY = "sk-test-0123456789"  # the guarded test app's key (tests/integration/test_reliability.py)


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
