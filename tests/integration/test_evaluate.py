"""The adoption evaluation (bench/evaluate.py) end to end against the real app: the files it writes
and the consistency of their numbers."""

import json

from bench import workload
from bench.evaluate import main


def test_the_evaluation_writes_results_a_report_and_plots_that_agree(app_url, metrics_url, tmp_path):
    _, extraction = workload.load("extraction")
    _, prose = workload.load("prose")
    items = extraction[:3] + prose[:1]
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    out = tmp_path / "out"
    main(["--target", f"dgserve={app_url}", "--route", "ar,auto", "--workload", str(path), "--concurrency", "1,2",
          "--stream", "both", "--metrics", metrics_url, "--out", str(out), "--no-progress"])

    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert {(r["target"], r["stream"], r["concurrency"]) for r in runs} == {
        (f"dgserve {route}", stream, c) for route in ("ar", "auto") for stream in (False, True) for c in (1, 2)}
    for r in runs:
        assert r["workload"] == "tiny" and r["n"] == len(items)
        assert r["invalid_success"] == 0  # dgserve never returns a 200 that fails its schema
        assert r["ok"] + sum(r["errors"].values()) == r["n"]
        assert r["valid"] <= 3 and r["valid_rate"] == r["valid"] / r["n"]
        assert r["exact"] <= r["valid"] and r["exact_rate"] == r["exact"] / r["n"]
        assert abs(r["req_per_s"] * r["wall_s"] - r["n"]) < 1e-6
        assert abs(r["tok_per_s"] * r["wall_s"] - r["tokens"]) < 1e-6 and r["tokens"] > 0
        assert r["p50_s"] <= r["p90_s"] and r["ttft_p50_s"] <= r["p50_s"] + 1e-9
        assert sum(r["routes"].values()) == r["ok"]
        for key in ("p50_s", "p90_s", "ttft_p50_s", "tok_per_s", "req_per_s", "errors", "exact", "valid"):
            assert key in r
    forced = [r for r in runs if r["route"] == "ar"]
    assert all(set(r["routes"]) == {"ar"} for r in forced)  # the route the harness asked for served them
    plain = [r for r in runs if not r["stream"]]
    assert all(r["forwards_per_token"] and r["cost_per_mtok_usd"] > 0 for r in plain)

    report = (out / "report.md").read_text()
    for r in runs:  # every table row comes from results.json
        label = f"{r['target']}{' (streamed)' if r['stream'] else ''}"
        assert f"| {label} | {r['concurrency']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} |" in report
        assert (f"| {label} | {r['concurrency']} | {r['n']} | {r['valid_rate']:.2f} | {r['exact_rate']:.2f} | "
                f"{r['invalid_success']} |") in report
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 5
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in pngs)
    assert all(f"]({p.name})" in report for p in pngs)
