"""Per-request path choice, with the reason recorded.

Hard rules first, in this order:

1. an explicit ``route`` other than ``auto`` is honoured (``verify`` and ``diffusion`` fall back to
   ``ar`` only when the drafter is out of rotation);
2. drafter unhealthy (recent failures, cooling down) -> ``ar``;
3. only the paths that can serve the request here are considered (:func:`eligible_paths`): the
   verify route samples only where the verifier shares the drafter's process.

Then, with ``policy.kind == "measured"`` (the default), the path predicted to serve the request
fastest (:func:`measured_route`), among those whose shadow-verified agreement with AR meets
``min_agreement``; with ``"static"`` (or before anything is measured), the fixed rules
(:func:`static_route`). :mod:`pipeline.route_estimates` says how the predictions are made.

A request routed to the drafter that the drafter cannot take (its queue full, or the replica
failing) is served by AR: :func:`failover` is that decision, made here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from models.temperature import is_greedy

from .route_estimates import PATHS, Path, PathEstimate, ShapeKey

__all__ = ["PATHS", "Path", "RouterPolicy", "RequestShape", "Load", "RouteDecision", "choose_route",
           "measured_route", "static_route", "below_floor", "failover", "eligible_paths"]


@dataclass(frozen=True)
class RouterPolicy:
    kind: Literal["measured", "static"] = "measured"
    # static policy: beyond this many drafter requests in flight, AR
    drafter_queue_threshold: int = 8
    prose_route: Literal["diffusion", "verify", "ar"] = "diffusion"
    greedy_prose_route: Literal["diffusion", "verify", "ar"] | None = None  # used when temperature == 0
    # a drafter answer not back within this share of the request's remaining time is given up and
    # AR serves the request (a replica that died or hangs with the request in it, a handle waiting
    # for a replica that is still starting): the rest of the time is AR's. Routes the router chose
    # only: a route the client named keeps the whole deadline.
    drafter_deadline_share: float = 0.5
    # measured policy: a path whose agreement with AR's greedy is under this (once measured on
    # ``min_agreement_samples`` answers) is not chosen for that shape
    min_agreement: float = 0.8
    min_agreement_samples: int = 3
    shadow_share: float = 0.05  # share of diffusion answers also scored by the AR verifier, off the critical path
    explore_share: float = 0.02  # share of auto requests sent to the least recently measured other path
    calibration_requests: int = 2  # per path and request shape at start-up (0: none)
    estimate_decay: float = 0.95  # weight of the observation before the newest one
    stream_tie: float = 1.05  # streams: first chunks within this factor of the best tie, the sooner end wins


@dataclass(frozen=True)
class RequestShape:
    structured: bool
    stream: bool
    temperature: float
    requested: str = "auto"
    max_tokens: int = 256

    def key(self) -> ShapeKey:
        return ShapeKey.of(self.structured, self.stream, self.max_tokens)


@dataclass(frozen=True)
class Load:
    drafter_queue: int  # drafter requests in flight from this ingress
    drafter_healthy: bool = True
    in_flight: int = 0  # requests on any path in flight from this ingress, this one not counted


@dataclass(frozen=True)
class RouteDecision:
    path: Path
    reason: str
    requested: bool = False  # the client named this route (it is not hedged by the deadline share)
    shape: str = ""  # the shape's label, where estimates were read
    # (path, predicted seconds, agreement or None) of each path with an estimate
    predicted: tuple[tuple[str, float, float | None], ...] = ()
    explored: bool = False  # sent to another path than the predicted best, to keep its estimate fresh

    def header(self) -> str:
        return f"{self.path}; reason={self.reason}"


def eligible_paths(shape: RequestShape, drafter: bool, sampled_verify: bool) -> tuple[Path, ...]:
    """The paths that can serve ``shape`` here. ``drafter``: one is configured; ``sampled_verify``:
    the verify route can sample (its verifier shares the drafter's process: sampled verification
    redraws from the verifier's whole distribution at each draft position, which a verifier
    elsewhere does not return). A sampled request on a greedy-only verify route would be a 400."""
    if not drafter:
        return ("ar",)
    if not sampled_verify and not is_greedy(shape.temperature):
        return ("ar", "diffusion")
    return PATHS


def choose_route(shape: RequestShape, load: Load, policy: RouterPolicy,
                 estimates: Mapping[str, PathEstimate] | None = None,
                 paths: tuple[Path, ...] = PATHS) -> RouteDecision:
    """Pure: the same shape, load, policy, estimates and eligible ``paths`` always give the same
    decision. ``auto`` chooses among ``paths`` only; a route the client names is honoured."""
    if shape.requested != "auto":
        if shape.requested in ("diffusion", "verify") and not load.drafter_healthy:
            return RouteDecision("ar", f"requested {shape.requested}, but the drafter is out of rotation")
        return RouteDecision(shape.requested, "requested by the client", requested=True)  # type: ignore[arg-type]
    if not load.drafter_healthy:
        return RouteDecision("ar", "drafter out of rotation after failures")
    if policy.kind == "measured":
        decision = measured_route(shape, load, policy, {p: e for p, e in (estimates or {}).items() if p in paths})
        if decision is not None:
            return decision
        static = _within(static_route(shape, load, policy), paths)
        return RouteDecision(static.path, f"{static.reason} (static rule: nothing measured yet)")
    return _within(static_route(shape, load, policy), paths)


def _within(decision: RouteDecision, paths: tuple[Path, ...]) -> RouteDecision:
    """A static rule's route, or the nearest eligible one: verify -> diffusion -> ar."""
    if decision.path in paths:
        return decision
    path: Path = "diffusion" if decision.path == "verify" and "diffusion" in paths else "ar"
    return RouteDecision(path, f"{decision.reason}; {decision.path} cannot serve it here")


def static_route(shape: RequestShape, load: Load, policy: RouterPolicy) -> RouteDecision:
    """The fixed rules: streaming prose -> ``ar`` (AR streams per token, the drafter per canvas:
    ~490 vs ~50 ms first token on the real model); a drafter queue deeper than
    ``drafter_queue_threshold`` -> ``ar``; structured -> ``diffusion`` (draft, validate, repair);
    other prose -> ``prose_route`` (``greedy_prose_route`` at temperature 0 when set)."""
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


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def measured_route(shape: RequestShape, load: Load, policy: RouterPolicy,
                   estimates: Mapping[str, PathEstimate]) -> RouteDecision | None:
    """Among the paths with an estimate whose agreement meets the floor, the one predicted to give
    a valid answer soonest at the current load; for prose streams, the soonest first chunk (ties
    within ``stream_tie``: the sooner end). None when no path has an estimate.

    Example (in flight 0): ar 0.14 s, diffusion 0.30 s, verify 0.52 s -> ``ar; reason=predicted
    140 ms vs diffusion 300 ms vs verify 520 ms (measured)``."""
    n = load.in_flight
    floor_out = {p: e for p, e in estimates.items() if below_floor(e, policy)}
    pool = {p: e for p, e in estimates.items() if p not in floor_out}
    if not pool:
        return None
    streamed = shape.stream and not shape.structured  # structured streams send one validated chunk
    end = {p: e.seconds(n) for p, e in pool.items()}
    if streamed:
        first = {p: e.first_chunk(n) for p, e in pool.items()}
        best_first = min(first.values())
        tied = [p for p in PATHS if p in pool and first[p] <= best_first * policy.stream_tie]
        best = min(tied, key=lambda p: end[p])
        others = " vs ".join(f"{p} {_ms(first[p])}" for p in PATHS if p in pool and p != best)
        said = f"predicted first chunk {_ms(first[best])} (end {_ms(end[best])})" + (f" vs {others}" if others else "")
    else:
        best = min((p for p in PATHS if p in pool), key=lambda p: end[p])
        others = " vs ".join(f"{p} {_ms(end[p])}" for p in PATHS if p in pool and p != best)
        said = f"predicted {_ms(end[best])}" + (f" vs {others}" if others else "")
    said += f" ({pool[best].source}, {n} in flight)"
    for p, e in floor_out.items():
        said += f"; {p} agreement {e.agreement:.2f} < {policy.min_agreement:g}"
    return RouteDecision(best, said, shape=shape.key().label,  # type: ignore[arg-type]
                         predicted=tuple((p, round(e.seconds(n), 4), e.agreement) for p, e in estimates.items()))


def below_floor(estimate: PathEstimate, policy: RouterPolicy) -> bool:
    """The path's measured agreement with AR is under the policy's floor."""
    return (estimate.agreement is not None and estimate.agreement_samples >= policy.min_agreement_samples
            and estimate.agreement < policy.min_agreement)


def failover(cause: Literal["overloaded", "failed", "late"], detail: str = "") -> RouteDecision:
    """The route of a drafter request the drafter could not take: AR serves it."""
    if cause == "overloaded":
        return RouteDecision("ar", "drafter queue full; served by AR")
    if cause == "late":
        return RouteDecision("ar", f"drafter gave no answer within {detail}; served by AR")
    return RouteDecision("ar", f"drafter failed ({detail}); served by AR")
