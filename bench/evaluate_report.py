"""``report.md`` and the PNG plots of a ``bench.evaluate`` run, from its ``results.json`` alone."""

from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 2, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}{unit}"
    return f"{x}{unit}"


def _ms(x) -> str:
    return "-" if x is None else f"{1000 * x:,.0f} ms"


def _key(run: dict) -> str:
    return f"{run['target']}{' (streamed)' if run['stream'] else ''}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _by_workload(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in results["runs"]:
        out.setdefault(run["workload"], []).append(run)
    return out


def findings(runs: list[dict]) -> list[str]:
    """Plain sentences on what differs between the targets, at the lowest and highest concurrency."""
    lines = []
    for c in sorted({r["concurrency"] for r in runs if not r["stream"]}):
        at = [r for r in runs if r["concurrency"] == c and not r["stream"]]
        if len(at) < 2:
            continue
        fast = max(at, key=lambda r: r["req_per_s"])
        quick = min((r for r in at if r["p50_s"] is not None), key=lambda r: r["p50_s"], default=None)
        parts = [f"most requests/s: {fast['target']} ({fast['req_per_s']:.2f}, next "
                 f"{max((r['req_per_s'] for r in at if r is not fast), default=0):.2f})"]
        if quick is not None:
            parts.append(f"lowest p50: {quick['target']} ({_ms(quick['p50_s'])})")
        for metric, label in (("valid_rate", "schema-valid"), ("exact_rate", "exact")):
            vals = [(r[metric], r["target"]) for r in at if r[metric] is not None]
            if len(vals) > 1 and max(vals)[0] != min(vals)[0]:
                parts.append(f"{label}: " + ", ".join(f"{t} {v:.2f}" for v, t in sorted(vals, reverse=True)))
        bad = [f"{r['target']} {r['invalid_success']}" for r in at if r["invalid_success"]]
        parts.append("invalid successes: " + (", ".join(bad) if bad else "none"))
        refused = [f"{r['target']} {sum(r['errors'].values())}" for r in at if r["errors"]]
        if refused:
            parts.append("errors: " + ", ".join(refused))
        lines.append(f"- concurrency {c}: " + "; ".join(parts) + ".")
        for r in at:
            if r["stage_s"]:
                top = max(r["stage_s"].items(), key=lambda kv: kv[1] or 0)
                lines.append(f"  - {r['target']}: its costliest stage is `{top[0]}` at {_ms(top[1])} a request "
                             f"(of {_ms(r['p50_s'])} p50); revised {_f(r['revision_rate'])} of its answers.")
    return lines


def report(results: dict, images: list[str]) -> str:
    meta = results["meta"]
    out = ["# Adoption evaluation", "",
           f"`{meta['command']}`, started {meta['started']}; workloads "
           + ", ".join(f"{k} ({v} requests)" for k, v in meta["workloads"].items())
           + f"; concurrency {', '.join(map(str, meta['concurrency']))}; cost at ${meta['gpu_hour_usd']:g} per "
           f"replica-hour x {meta['replicas']} replica(s). Every number below is read from `results.json`.", ""]
    for wname, runs in _by_workload(results).items():
        rows = sorted(runs, key=lambda r: (r["target"], r["stream"], r["concurrency"]))
        out += [f"## Workload `{wname}`", "", "**What differs**", ""] + findings(runs) + [""]
        out += ["### 1. Throughput", ""] + _table(
            ["target", "c", "requests/s", "output tokens/s"],
            [[_key(r), str(r["concurrency"]), _f(r["req_per_s"]), _f(r["tok_per_s"], 1)] for r in rows]) + [""]
        out += ["### 2. Quality", "", "Rates are over every request sent; a refusal counts as neither valid nor exact.",
                ""] + _table(
            ["target", "c", "n", "schema-valid", "exact", "invalid successes", "revision rate"],
            [[_key(r), str(r["concurrency"]), str(r["n"]), _f(r["valid_rate"]), _f(r["exact_rate"]),
              str(r["invalid_success"]), _f(r["revision_rate"])] for r in rows]) + [""]
        out += ["### 3. UX", "", "Time to first chunk is the first content delta when streamed and the whole "
                "answer when not.", ""] + _table(
            ["target", "c", "first chunk p50", "first chunk p90", "final p50", "final p90"],
            [[_key(r), str(r["concurrency"]), _ms(r["ttft_p50_s"]), _ms(r["ttft_p90_s"]), _ms(r["p50_s"]),
              _ms(r["p90_s"])] for r in rows]) + [""]
        out += ["### 4. Operations", ""] + _table(
            ["target", "c", "errors by status", "fallbacks", "repairs", "timeouts", "paths taken", "counters (delta)"],
            [[_key(r), str(r["concurrency"]), ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none",
              str(r["fallbacks"]), str(r["repairs"]), str(r["timeouts"]),
              ", ".join(f"{k} {v}" for k, v in sorted(r["routes"].items())) or "-",
              ", ".join(f"{k.removeprefix('ray_')} {v:g}" for k, v in sorted(r["metrics"].items())) or "-"]
             for r in rows]) + [""]
        out += ["### 5. Economics", ""] + _table(
            ["target", "c", "forwards per output token", "tokens per forward", "$ per million output tokens"],
            [[_key(r), str(r["concurrency"]), _f(r["forwards_per_token"]), _f(r["tokens_per_forward"]),
              _f(r["cost_per_mtok_usd"])] for r in rows]) + [""]
        stages = sorted({k for r in rows for k in r["stage_s"]})
        if stages:
            out += ["### Where dgserve's time goes", "", "Mean seconds per answer in each stage, from the "
                    "responses' `stats`.", ""] + _table(
                ["target", "c", *stages],
                [[_key(r), str(r["concurrency"]), *[_ms(r["stage_s"].get(s)) for s in stages]]
                 for r in rows if r["stage_s"]]) + [""]
        mine = [i for i in images if i.startswith(f"{wname}-")]
        if mine:
            out += ["### Plots", ""] + [f"![{i}]({i})" for i in mine] + [""]
    return "\n".join(out)


def plots(results: dict, out: Path) -> list[Path]:
    """Per workload: throughput, requests/s, latency, first chunk, quality, economics, stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for wname, runs in _by_workload(results).items():
        series: dict[str, list[dict]] = {}
        for r in sorted(runs, key=lambda r: r["concurrency"]):
            series.setdefault(_key(r), []).append(r)

        def lines(metric: str, title: str, ylabel: str, name: str, scale: float = 1.0, log: bool = False,
                  second: str | None = None) -> None:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            for label, rs in series.items():
                xs = [r["concurrency"] for r in rs if r[metric] is not None]
                (line,) = ax.plot(xs, [scale * r[metric] for r in rs if r[metric] is not None], marker="o",
                                  label=label, linestyle="--" if "streamed" in label else "-")
                if second is not None:
                    ax.plot([r["concurrency"] for r in rs if r[second] is not None],
                            [scale * r[second] for r in rs if r[second] is not None], marker=".", linestyle=":",
                            color=line.get_color())
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["concurrency"] for r in runs}), [str(c) for c in sorted({r["concurrency"] for r in runs})])
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("concurrent clients")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title} ({wname})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            save(fig, f"{wname}-{name}.png")

        lines("tok_per_s", "Output tokens/s", "tokens/s", "throughput")
        lines("req_per_s", "Requests/s", "requests/s", "requests")
        lines("p50_s", "Final answer latency: p50 (solid), p90 (dotted)", "ms", "latency", scale=1000, second="p90_s")
        lines("ttft_p50_s", "Time to first chunk: p50 (solid), p90 (dotted)", "ms", "first-chunk", scale=1000,
              second="ttft_p90_s")
        lines("cost_per_mtok_usd", "Cost per million output tokens", "USD", "cost", log=True)

        low = min(r["concurrency"] for r in runs)
        at = [r for r in runs if r["concurrency"] == low]
        fig, ax = plt.subplots(figsize=(6.4, 4))
        metrics = [("valid_rate", "schema-valid"), ("exact_rate", "exact"), ("revision_rate", "revised")]
        width = 0.8 / len(metrics)
        for j, (m, label) in enumerate(metrics):
            ax.bar([i + j * width for i in range(len(at))], [r[m] or 0 for r in at], width, label=label)
        for i, r in enumerate(at):
            ax.annotate(f"invalid successes: {r['invalid_success']}", (i + width, 1.02), ha="center", fontsize=7)
        ax.set_xticks([i + width for i in range(len(at))], [_key(r) for r in at], rotation=15, fontsize=8)
        ax.set_ylim(0, 1.12)
        ax.set_title(f"Quality at concurrency {low} ({wname})")
        ax.legend(fontsize=8)
        save(fig, f"{wname}-quality.png")

        staged = [r for r in at if r["stage_s"]]
        if staged:
            fig, ax = plt.subplots(figsize=(6.4, 4))
            names = sorted({k for r in staged for k in r["stage_s"]})
            bottom = [0.0] * len(staged)
            for k in names:
                vals = [1000 * (r["stage_s"].get(k) or 0) for r in staged]
                ax.bar(range(len(staged)), vals, 0.6, bottom=bottom, label=k)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.plot(range(len(staged)), [1000 * (r["p50_s"] or 0) for r in staged], "k_", markersize=30,
                    label="p50 end to end")
            ax.set_xticks(range(len(staged)), [_key(r) for r in staged], rotation=15, fontsize=8)
            ax.set_ylabel("ms per answer (mean)")
            ax.set_title(f"Where dgserve's time goes, concurrency {low} ({wname})")
            ax.legend(fontsize=8)
            save(fig, f"{wname}-stages.png")
    return written
