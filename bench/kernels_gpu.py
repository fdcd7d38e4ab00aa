"""GPU benchmark of the sampler kernels: torch reference vs Triton, real vocabulary, canvas 256.

``python -m bench.kernels_gpu [--batches 1,4,8,16] [--json]`` on a CUDA machine prints, per batch
size, the step time (position statistics + self-conditioning input) and the peak GPU memory
beyond the bf16 logits for both backends, and checks that they agree (argmax, Gumbel sample).
Finishes in a few minutes on one H100.
"""

from __future__ import annotations

import argparse
import json


def measure(fn, repeats: int = 5) -> tuple[float, int]:
    import torch

    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats, torch.cuda.max_memory_allocated() - base


def main(argv=None) -> None:
    import torch

    from kernels import sampler, sampler_triton

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--vocab", type=int, default=262144)
    p.add_argument("--canvas", type=int, default=256)
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    emb = torch.randn(a.vocab, a.hidden, device="cuda", dtype=torch.bfloat16)
    rows = []
    for b in (int(x) for x in a.batches.split(",")):
        logits = torch.randn(b, a.canvas, a.vocab, device="cuda", dtype=torch.bfloat16)
        ref = sampler.position_stats(logits, 0.8, 1)
        tri = sampler_triton.position_stats(logits, 0.8, 1)
        agree = bool(torch.equal(ref.argmax, tri.argmax)) and float((ref.sample == tri.sample).float().mean()) > 0.999
        row = {"batch": b, "logits_bytes": logits.numel() * logits.element_size(), "agree": agree}
        for name, mod in (("reference", sampler), ("triton", sampler_triton)):
            ms, extra = measure(lambda m=mod, lg=logits: (m.position_stats(lg, 0.8, 1), m.soft_embedding(lg, emb)))
            row[f"{name}_ms"], row[f"{name}_extra_bytes"] = round(ms, 3), extra
        rows.append(row)
        del logits, ref, tri
        torch.cuda.empty_cache()
    if a.json:
        print(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}))
        return
    print(torch.cuda.get_device_name())
    print(f"{'batch':>5} {'ref ms':>9} {'triton ms':>10} {'ref extra GiB':>14} {'triton extra GiB':>17} agree")
    for r in rows:
        print(f"{r['batch']:>5} {r['reference_ms']:>9} {r['triton_ms']:>10} {r['reference_extra_bytes'] / 2**30:>14.2f} "
              f"{r['triton_extra_bytes'] / 2**30:>17.3f} {r['agree']}")


if __name__ == "__main__":
    main()
