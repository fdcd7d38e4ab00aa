"""What the router knows about each path: running estimates per path and request shape.

Two things are estimated, both from what the stages already report, decayed so that they follow
the live deployment (each new observation weighs ``1``, the one before ``decay``, ...):

* **cost**: seconds from the start of a request to its valid answer (repair and fallback
  included, so a path's repair rate and repair cost are in it) as a line in the number of
  requests in flight when it started: ``seconds = base + per_in_flight * in_flight``. Both paths
  share one replica's cores (one copy of the weights), so the load that slows a path is all the
  work in flight. The slope is a weighted least-squares fit pulled toward *serial queueing*
  (every request ahead costs one service time) until the observations span several loads; the
  time to the **first chunk** scales with the same load factor.
* **agreement** (shadow verification): the share of a path's answer that AR's greedy decoding
  agrees with, as the accepted prefix of one verify forward over ``prompt + answer`` divided by
  the answer's length. AR and the verify route decode AR's own distribution, so they are the
  reference (1.0); the diffusion path is sampled.

Worked example: AR answers at 0 in flight in 0.14 s and at 7 in flight in 0.45 s; the fit gives
``base`` ~0.14, ``per_in_flight`` ~0.044, so at 4 in flight it predicts ~0.32 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

Path = Literal["ar", "diffusion", "verify"]
PATHS: tuple[Path, ...] = ("ar", "diffusion", "verify")
REFERENCE_PATHS: frozenset[str] = frozenset({"ar", "verify"})  # AR's own decoding: agreement 1 by definition
TOKEN_BUCKETS = (64, 256)  # max_tokens buckets: <= 64, <= 256, more
Source = Literal["prior", "calibrated", "measured"]


@dataclass(frozen=True)
class ShapeKey:
    """The request shape the estimates are kept per: structured or not, streamed or not, and the
    max_tokens bucket (an index into ``TOKEN_BUCKETS``; ``len(TOKEN_BUCKETS)``: beyond the last)."""

    structured: bool
    stream: bool
    bucket: int

    @classmethod
    def of(cls, structured: bool, stream: bool, max_tokens: int) -> "ShapeKey":
        return cls(structured, stream, sum(max_tokens > b for b in TOKEN_BUCKETS))

    @property
    def label(self) -> str:
        tokens = f"<={TOKEN_BUCKETS[self.bucket]}" if self.bucket < len(TOKEN_BUCKETS) else f">{TOKEN_BUCKETS[-1]}"
        return f"{'structured' if self.structured else 'prose'}/{'stream' if self.stream else 'whole'}/{tokens}"

    def distance(self, other: "ShapeKey") -> int | None:
        """How far ``other``'s estimates are from this shape's (None: not comparable)."""
        if other.structured != self.structured:
            return None
        return 2 * abs(other.bucket - self.bucket) + (other.stream != self.stream)


@dataclass(frozen=True)
class PathEstimate:
    """One path's estimate for one request shape (what :func:`pipeline.router.choose_route` reads)."""

    base_s: float  # seconds to a valid answer with nothing else in flight
    per_in_flight_s: float  # seconds added per request in flight
    first_chunk_s: float  # seconds to the first chunk with nothing else in flight
    samples: float = 1.0  # decayed weight of the observations behind it
    source: Source = "measured"
    agreement: float | None = None  # shadow-verified agreement with AR's greedy; None: not measured
    agreement_samples: int = 0

    def seconds(self, in_flight: int) -> float:
        return self.base_s + self.per_in_flight_s * max(0, in_flight)

    def first_chunk(self, in_flight: int) -> float:
        return self.first_chunk_s * self.seconds(in_flight) / max(self.base_s, 1e-9)


@dataclass
class _Fit:
    """Decayed weighted sums for ``y = base + slope * x`` and the first chunk ``f``."""

    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    sf: float = 0.0
    measured: bool = False  # any observation from live traffic (else calibration only)

    def add(self, x: float, y: float, f: float, decay: float) -> None:
        self.w, self.sx, self.sy = decay * self.w + 1, decay * self.sx + x, decay * self.sy + y
        self.sxx, self.sxy, self.sf = decay * self.sxx + x * x, decay * self.sxy + x * y, decay * self.sf + f

    def estimate(self, prior_weight: float) -> PathEstimate:
        mx, my = self.sx / self.w, self.sy / self.w
        serial = my / (1 + mx)  # serial queueing: each request in flight costs one service time
        vxx, vxy = self.sxx - self.w * mx * mx, self.sxy - self.w * mx * my
        slope = max(0.0, (vxy + prior_weight * serial) / (max(vxx, 0.0) + prior_weight))
        base = max(1e-4, my - slope * mx)
        first = min(self.sf / self.w, my) * base / max(my, 1e-9)  # first chunk at no load
        return PathEstimate(round(base, 5), round(slope, 5), round(first, 5), round(self.w, 2),
                            "measured" if self.measured else "calibrated")


@dataclass
class _Mean:
    w: float = 0.0
    s: float = 0.0
    n: int = 0

    def add(self, v: float, decay: float) -> None:
        self.w, self.s, self.n = decay * self.w + 1, decay * self.s + v, self.n + 1


@dataclass
class RouteEstimates:
    """Running cost and agreement estimates per (path, shape). ``prior``: estimates to start from
    (a profile, e.g. in a test or a replay) for shapes nothing has been observed for yet."""

    decay: float = 0.95
    prior_weight: float = 2.0  # how strongly the slope is pulled toward serial queueing
    prior: dict[tuple[str, ShapeKey], PathEstimate] = field(default_factory=dict)
    _fits: dict[tuple[str, ShapeKey], _Fit] = field(default_factory=dict)
    _agree: dict[tuple[str, bool, int], _Mean] = field(default_factory=dict)
    observed: int = 0  # observations so far (the reason says when they are few)

    def observe(self, path: str, key: ShapeKey, in_flight: int, seconds: float, first_chunk_s: float | None,
                calibration: bool = False) -> None:
        fit = self._fits.setdefault((path, key), _Fit())
        fit.add(float(in_flight), seconds, seconds if first_chunk_s is None else min(first_chunk_s, seconds), self.decay)
        fit.measured = fit.measured or not calibration
        self.observed += 1

    def observe_agreement(self, path: str, key: ShapeKey, agreement: float) -> None:
        self._agree.setdefault((path, key.structured, key.bucket), _Mean()).add(agreement, self.decay)

    def agreement(self, path: str, key: ShapeKey) -> tuple[float | None, int]:
        if path in REFERENCE_PATHS:
            return 1.0, 0
        near = [(abs(b - key.bucket), m) for (p, s, b), m in self._agree.items() if p == path and s == key.structured]
        if not near:
            return None, 0
        m = min(near, key=lambda t: t[0])[1]
        return m.s / m.w, m.n

    def estimate(self, path: str, key: ShapeKey) -> PathEstimate | None:
        """The nearest shape's estimate for ``path`` (this shape's own where it has one)."""
        near = [(key.distance(k), fit) for (p, k), fit in self._fits.items() if p == path]
        near = [(d, fit) for d, fit in near if d is not None]
        if near:
            est = min(near, key=lambda t: t[0])[1].estimate(self.prior_weight)
        else:
            near_prior = [(key.distance(k), e) for (p, k), e in self.prior.items() if p == path]
            near_prior = [(d, e) for d, e in near_prior if d is not None]
            if not near_prior:
                return None
            est = min(near_prior, key=lambda t: t[0])[1]
        agreement, n = self.agreement(path, key)
        if agreement is None:
            agreement, n = est.agreement, est.agreement_samples
        return PathEstimate(est.base_s, est.per_in_flight_s, est.first_chunk_s, est.samples, est.source,
                            None if agreement is None else round(agreement, 4), n)

    def for_shape(self, key: ShapeKey, paths: Iterable[str] = PATHS) -> dict[str, PathEstimate]:
        out = {}
        for p in paths:
            est = self.estimate(p, key)
            if est is not None:
                out[p] = est
        return out

    def snapshot(self) -> list[dict]:
        """Every (path, shape) observed so far, for ``/health``."""
        rows = []
        for (path, key), fit in sorted(self._fits.items(), key=lambda kv: (kv[0][0], kv[0][1].label)):
            est = self.estimate(path, key)
            rows.append({"path": path, "shape": key.label, "base_s": est.base_s, "per_in_flight_s": est.per_in_flight_s,
                         "first_chunk_s": est.first_chunk_s, "samples": est.samples, "source": est.source,
                         "agreement": est.agreement, "agreement_samples": est.agreement_samples})
        return rows


def calibration_jobs(max_tokens: int = 64, seed: int = 9) -> list:
    """What a start-up calibration sends on each path: (job, stream) for a structured request, a
    prose request and a streamed prose request, from the synthetic tasks' held-out split
    (``models/tasks.py``), greedy."""
    from models import tasks

    from .interfaces import Constraint, ConstraintKind, Job

    structured = next(tasks.examples("eval", seed, 1, kind="json"))
    prose = next(tasks.examples("eval", seed, 1, kind="prose"))
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, structured.schema)
    return [(Job((("user", structured.instruction),), None, max_tokens, constraint=constraint), False),
            (Job((("user", prose.instruction),), None, max_tokens), False),
            (Job((("user", prose.instruction),), None, max_tokens), True)]
