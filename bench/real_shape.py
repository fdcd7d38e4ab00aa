"""Denoising at the real model's width on this machine: ms per step and peak memory per step.

One layer of the published 26B-A4B width (``models/real_shape.py``: V = 262,144, hidden 2,816,
128 experts, canvas 256), random weights, a fixed number of steps (random weights never settle).
Peak memory per step is the highest RSS seen while a step runs (sampled every 2 ms) minus the RSS
before it: activations, logits, the sampler's work and the self-conditioning input, beyond the
weights. The logits alone are ``batch x 256 x 262,144 x 4`` bytes (268 MB per row in float32).

Run: ``python -m bench.real_shape --layers 1 --batch 1,4 --steps 3 --json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


class PeakRSS:
    """Highest resident set size while the ``with`` block runs (a sampling thread)."""

    def __init__(self, period_s: float = 0.002):
        import psutil

        self.proc = psutil.Process()
        self.period_s = period_s
        self.peak = 0

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def measure(drafter, batch: int, steps: int, prompt: list[int]) -> dict:
    import torch

    with torch.inference_mode():
        return _measure(drafter, batch, steps, prompt)


def _measure(drafter, batch: int, steps: int, prompt: list[int]) -> dict:
    import torch

    from models.drafter import DraftRow, DraftSettings

    settings = DraftSettings(max_steps=1, confidence_threshold=-1.0)
    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids, dtype=torch.bool)
    cache = drafter.new_cache()
    drafter.encode(cache, ids, mask, 0)
    times, extra = [], []
    for step in range(steps + 1):  # the first step warms up
        rows = [DraftRow(len(prompt), 256, None) for _ in range(batch)]
        with PeakRSS() as peak:
            t = time.perf_counter()
            drafter.denoise_canvas(cache, mask, len(prompt), rows, step, seed=step, settings=settings)
            elapsed = time.perf_counter() - t
        if step:
            times.append(elapsed * 1000)
            extra.append(peak.extra_mb)
    logits_mb = batch * drafter.canvas_length * drafter.vocab_size * 4 / 2**20
    return {"batch": batch, "ms_per_step": round(statistics.median(times), 1),
            "peak_extra_mb": round(max(extra), 1), "logits_mb": round(logits_mb, 1),
            "peak_over_logits": round(max(extra) / logits_mb, 2), "backend": drafter.backend}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default=None, help="sampler backend (default: select_backend)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import torch

    from models.drafter import DiffusionDrafter
    from models.real_shape import load_real_shape
    from models.tokenizer import encode_prompt

    torch.set_num_threads(a.threads)
    model, tokenizer = load_real_shape(a.layers)
    drafter = DiffusionDrafter(model, tokenizer, backend=a.backend)
    prompt = encode_prompt(tokenizer, "Extract the city as JSON: we met in Rome.")
    rows = [measure(drafter, int(b), a.steps, prompt) for b in a.batch.split(",")]
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = {"layers": a.layers, "vocab": drafter.vocab_size, "canvas": drafter.canvas_length,
           "weights_gb": round(weights_gb, 2), "threads": a.threads, "rows": rows}
    if a.json:
        print(json.dumps(out))
    else:
        for r in rows:
            print(r)


if __name__ == "__main__":
    main()
