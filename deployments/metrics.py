"""Request metrics through Ray Serve's metrics API (exported by Ray's metrics agent for Prometheus).

The metric set and the mapping from a finished request to metric updates live in
``pipeline/telemetry.py``; this module only binds them to ``ray.serve.metrics``. Ray adds the
``ray_`` prefix and the application/deployment/replica tags; counters get ``_total``.
"""

from ray.serve.metrics import Counter, Gauge, Histogram

from pipeline.telemetry import METRICS, RequestObservation, metric_events


class ServeMetrics:
    def __init__(self):
        self.instruments = {}
        for spec in METRICS:
            if spec.kind == "counter":
                self.instruments[spec.name] = Counter(spec.name, description=spec.description, tag_keys=spec.tags)
            elif spec.kind == "gauge":
                self.instruments[spec.name] = Gauge(spec.name, description=spec.description, tag_keys=spec.tags)
            else:
                self.instruments[spec.name] = Histogram(spec.name, description=spec.description,
                                                        boundaries=list(spec.boundaries), tag_keys=spec.tags)

    def observe(self, obs: RequestObservation) -> None:
        for name, value, tags in metric_events(obs):
            inst = self.instruments[name]
            if isinstance(inst, Counter):
                inst.inc(value, tags=tags)
            elif isinstance(inst, Gauge):
                inst.set(value, tags=tags)
            else:
                inst.observe(value, tags=tags)
