"""Evaluation workloads: JSONL files of requests, each with what its answer is graded against.

One request per line: ``{"id", "messages": [...], "max_tokens", "response_format"?, "gold"?}``;
``gold`` is the expected answer (a JSON value for a structured request, compared after parsing; a
string otherwise). Three ship in ``bench/workloads/``:

* ``extraction.jsonl``: 60 held-out synthetic extraction tasks (``models.tasks`` eval split, seed
  401: never trained on), each with its own schema and its gold answer;
* ``jsonschemabench.jsonl``: 40 real schemas from JSONSchemaBench's Github_easy set (the first 40
  of ``../shared/data/jsonschemabench/Github_easy.jsonl``, MIT licence), no gold: graded on
  validity;
* ``prose.jsonl``: 40 held-out prose prompts, no constraint, no gold.

``python -m bench.workload [--shared ../shared/data]`` writes them again (deterministic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DIR = Path(__file__).resolve().parent / "workloads"
NAMES = ("extraction", "jsonschemabench", "prose")
SCHEMA_PROMPT = "Return a JSON object that follows the schema.\nSchema: {schema}\nText: Use realistic example values."


def load(name_or_path: str) -> tuple[str, list[dict]]:
    """(name, items) of a shipped workload (by name) or of any JSONL file."""
    path = DIR / f"{name_or_path}.jsonl" if name_or_path in NAMES else Path(name_or_path)
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, it in enumerate(items):
        if not it.get("messages"):
            raise ValueError(f"{path}:{i + 1}: every request needs messages")
        it.setdefault("id", str(i))
    return path.stem, items


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def extraction(n: int = 60, seed: int = 401) -> list[dict]:
    from models import tasks

    return [{"id": f"extraction-{i}", "messages": [{"role": "user", "content": ex.instruction}], "max_tokens": 64,
             "response_format": _schema_format(ex.schema), "gold": json.loads(ex.target)}
            for i, ex in enumerate(tasks.examples("eval", seed, n, kind="json"))]


def jsonschemabench(shared: Path, n: int = 40) -> list[dict]:
    rows = [json.loads(line) for line in (shared / "jsonschemabench" / "Github_easy.jsonl").read_text().splitlines()[:n]]
    return [{"id": r["id"], "max_tokens": 128, "response_format": _schema_format(r["schema"]),
             "messages": [{"role": "user", "content": SCHEMA_PROMPT.format(schema=json.dumps(r["schema"], separators=(",", ":")))}]}
            for r in rows]


def prose(n: int = 40, seed: int = 401) -> list[dict]:
    from models import tasks

    return [{"id": f"prose-{i}", "messages": [{"role": "user", "content": ex.instruction}], "max_tokens": 64}
            for i, ex in enumerate(tasks.examples("eval", seed, n, kind="prose"))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    a = ap.parse_args()
    DIR.mkdir(exist_ok=True)
    for name, items in (("extraction", extraction()), ("jsonschemabench", jsonschemabench(a.shared)), ("prose", prose())):
        (DIR / f"{name}.jsonl").write_text("".join(json.dumps(it, separators=(",", ":")) + "\n" for it in items))
        print(f"{DIR / name}.jsonl: {len(items)} requests")


if __name__ == "__main__":
    main()
