"""Per-request path choice, with the reason recorded.

Rules, first match wins:

1. an explicit ``route`` other than ``auto`` is honoured (``verify`` and ``diffusion`` fall back to
   ``ar`` only when the drafter is out of rotation);
2. drafter unhealthy (recent failures, cooling down) -> ``ar``;
3. streaming prose -> ``ar``: AR streams token by token, while the drafter's first chunk is a whole
   canvas (~490 ms vs ~50 ms first token on the real model);
4. drafter queue deeper than ``drafter_queue_threshold`` -> ``ar`` (the drafter's lead fades
   beyond ~32 concurrent requests on an H100);
5. structured output -> ``diffusion`` (draft, validate, then AR repair or fallback);
6. non-streaming prose -> ``prose_route`` (``diffusion`` by default; ``verify`` gives AR-exact
   greedy output when ``temperature == 0``).

A request routed to the drafter that the drafter cannot take (its queue full, or the replica
failing) is served by AR: :func:`failover` is that decision, made here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Path = Literal["ar", "diffusion", "verify"]


@dataclass(frozen=True)
class RouterPolicy:
    drafter_queue_threshold: int = 8
    prose_route: Literal["diffusion", "verify", "ar"] = "diffusion"
    greedy_prose_route: Literal["diffusion", "verify", "ar"] | None = None  # used when temperature == 0
    # a drafter answer not back within this share of the request's remaining time is given up and
    # AR serves the request (a replica that died or hangs with the request in it, a handle waiting
    # for a replica that is still starting): the rest of the time is AR's. Routes the router chose
    # only: a route the client named keeps the whole deadline.
    drafter_deadline_share: float = 0.5


@dataclass(frozen=True)
class RequestShape:
    structured: bool
    stream: bool
    temperature: float
    requested: str = "auto"


@dataclass(frozen=True)
class Load:
    drafter_queue: int  # drafter requests in flight from this ingress
    drafter_healthy: bool = True


@dataclass(frozen=True)
class RouteDecision:
    path: Path
    reason: str
    requested: bool = False  # the client named this route (it is not hedged by the deadline share)

    def header(self) -> str:
        return f"{self.path}; reason={self.reason}"


def choose_route(shape: RequestShape, load: Load, policy: RouterPolicy) -> RouteDecision:
    if shape.requested != "auto":
        if shape.requested in ("diffusion", "verify") and not load.drafter_healthy:
            return RouteDecision("ar", f"requested {shape.requested}, but the drafter is out of rotation")
        return RouteDecision(shape.requested, "requested by the client", requested=True)  # type: ignore[arg-type]
    if not load.drafter_healthy:
        return RouteDecision("ar", "drafter out of rotation after failures")
    if shape.stream and not shape.structured:
        return RouteDecision("ar", "streaming prose: AR streams per token, the drafter per canvas")
    if load.drafter_queue > policy.drafter_queue_threshold:
        return RouteDecision(
            "ar", f"drafter queue {load.drafter_queue} > threshold {policy.drafter_queue_threshold}")
    if shape.structured:
        return RouteDecision("diffusion", "structured output: draft, validate, repair on AR if invalid")
    if shape.temperature == 0 and policy.greedy_prose_route is not None:
        return RouteDecision(policy.greedy_prose_route, "greedy prose policy")
    return RouteDecision(policy.prose_route, "non-streaming prose: the drafter is fastest per request")


def failover(cause: Literal["overloaded", "failed", "late"], detail: str = "") -> RouteDecision:
    """The route of a drafter request the drafter could not take: AR serves it."""
    if cause == "overloaded":
        return RouteDecision("ar", "drafter queue full; served by AR")
    if cause == "late":
        return RouteDecision("ar", f"drafter gave no answer within {detail}; served by AR")
    return RouteDecision("ar", f"drafter failed ({detail}); served by AR")
