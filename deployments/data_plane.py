"""How requests reach the app: the environment Ray starts with, and the Ingress replicas' own HTTP
servers that it opens.

Ray reads these variables when each of its processes starts, so they belong to ``ray start`` (or to
the process that starts a local Ray: ``serve run``, ``ray.init``), not to a serve config:

* ``RAY_AUTH_MODE=token``: every Ray process authenticates (the token file: ``make ray-token``);
* ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: Ray Serve's throughput data plane. Replica-to-replica calls
  go over gRPC, user code runs on the replica's own event loop (no hand-off to a second thread per
  call), and each Ingress replica serves HTTP itself ("direct ingress") on a port of its own, bound
  to ``http_options.host``, besides Serve's proxy on ``http_options.port``. A load balancer that
  sends traffic to those ports (Ray's HAProxy with ``RAY_SERVE_ENABLE_HA_PROXY=1``, or your own,
  fed by the targets below) takes Serve's Python proxy, which parses every request and relays it
  over a Ray call, out of the request path.

A value already in the environment wins (``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` runs Serve's
defaults). What each costs: docs/benchmarks.md#data-plane.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, MutableMapping

RAY_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


def ray_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) over :data:`RAY_ENV`: its own values win."""
    return {**RAY_ENV, **(os.environ if environ is None else environ)}


def apply(environ: MutableMapping[str, str] | None = None) -> None:
    """Set :data:`RAY_ENV` in ``environ`` (default: this process's) where it is not set, before this
    process starts Ray or imports it."""
    environ = os.environ if environ is None else environ
    for k, v in RAY_ENV.items():
        environ.setdefault(k, v)


def direct_ingress_urls(details: Mapping[str, Any], app: str) -> list[str]:
    """The base URLs of application ``app``'s Ingress replicas' own HTTP servers, from Serve's
    instance details (``GET /api/serve/applications/`` on the dashboard, or the Serve client's
    ``get_serve_details()``): the targets of its HTTP target group, each at the host the replicas
    bind (``http_options.host``; a target's ``ip`` is its node's address, which a replica bound to
    127.0.0.1 does not answer on). Empty while direct ingress is off or no replica is running.

    Example: a target ``{"ip": "10.0.0.5", "port": 30000, ...}`` with ``http_options.host``
    ``127.0.0.1`` -> ``http://127.0.0.1:30000``; with host ``0.0.0.0`` -> ``http://10.0.0.5:30000``.
    """
    host = (details.get("http_options") or {}).get("host") or "127.0.0.1"
    urls = []
    for group in details.get("target_groups") or []:
        if group.get("app_name") != app or group.get("protocol") != "HTTP":
            continue
        for t in group.get("targets") or []:
            at = t["ip"] if host in ("0.0.0.0", "::") else host
            urls.append(f"http://{at}:{t['port']}{(group.get('route_prefix') or '/').rstrip('/')}")
    return urls
