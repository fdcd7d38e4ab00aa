"""The prepared device check runs its sections at a reduced shape on the CPU (--dry-run)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_reports_every_section():
    p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    sections = {s["section"]: s for s in report["sections"]}
    assert list(sections) == ["env", "transformers_drafter", "vllm_diffusion", "vllm_ar", "triton_sampler",
                              "tiny_parity"]
    assert sections["env"]["status"] == "ok"
    drafter = sections["transformers_drafter"]
    assert drafter["status"] == "ok", drafter
    assert [r["batch"] for r in drafter["rows"]] == [1, 4]
    assert all(r["steps_per_canvas"] == report["steps"] and r["ms_per_step"] > 0 for r in drafter["rows"])
    triton = sections["triton_sampler"]
    assert triton["status"] == "ok" and triton["interpreted"], triton
    assert all(r["argmax_equal"] and r["sample_agree"] == 1.0 for r in triton["rows"])
    for name in ("vllm_diffusion", "vllm_ar", "tiny_parity"):
        assert sections[name]["status"] == "needs_cuda", sections[name]
        try:
            import vllm  # noqa: F401
        except ImportError:
            continue
        assert sections[name]["engine_args_checked"] is True
