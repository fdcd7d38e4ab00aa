"""Peak memory and time of one sampler step at DiffusionGemma's real size, per backend.

``python -m bench.sampler_memory --json`` (defaults: vocabulary 262144, canvas 256, batch 8,
float32 logits = 2.1 GiB) runs each backend in a fresh subprocess: it allocates the logits, then
runs the step (position statistics + self-conditioning input against a hidden-2816 bf16
embedding) and reports the peak resident memory beyond what it held before the step
(``reference_extra_bytes``, ``fused_extra_bytes`` for the chunked CPU kernel), and the step times.
Target: fused extra memory <= 5% of the logits tensor.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def resident_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(backend: str, batch: int, canvas: int, vocab: int, hidden: int) -> dict:
    import torch

    from kernels.dispatch import ops

    torch.set_num_threads(2)
    stats_op, soft_op = ops(backend)
    logits = torch.randn(batch, canvas, vocab)  # allocated in place: no transient copy
    embedding = torch.randn(vocab, hidden, dtype=torch.bfloat16)
    before = resident_bytes()
    t0 = time.perf_counter()
    stats = stats_op(logits, 0.8, 1)
    t1 = time.perf_counter()
    soft = soft_op(logits, embedding)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert stats.argmax.shape == (batch, canvas) and soft.shape == (batch, canvas, hidden)
    return {"extra_bytes": peak - before, "stats_s": round(t1 - t0, 3), "soft_embedding_s": round(t2 - t1, 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--json", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.batch, a.canvas, a.vocab, a.hidden)))
        return
    runs = {}
    for backend in ("reference", "chunked"):
        cmd = [sys.executable, "-m", "bench.sampler_memory", "--child", backend, "--vocab", str(a.vocab),
               "--canvas", str(a.canvas), "--batch", str(a.batch), "--hidden", str(a.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_bytes = a.batch * a.canvas * a.vocab * 4
    result = {
        "batch": a.batch, "canvas": a.canvas, "vocab": a.vocab, "logits_bytes": logits_bytes,
        "reference_extra_bytes": runs["reference"]["extra_bytes"],
        "fused_extra_bytes": runs["chunked"]["extra_bytes"],
        "fused_extra_fraction": round(runs["chunked"]["extra_bytes"] / logits_bytes, 4),
        "reference_step_s": runs["reference"]["stats_s"] + runs["reference"]["soft_embedding_s"],
        "fused_step_s": runs["chunked"]["stats_s"] + runs["chunked"]["soft_embedding_s"],
        "detail": runs,
    }
    print(json.dumps(result) if a.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
