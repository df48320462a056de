"""Helpers shared by the benchmark scripts: where results and cached models live, and table writing."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT.parent / ".cache"
# the seeded defense table's fixed suspects, committed: a suspect rebuilt on another machine differs (docs/tuning.md)
SUSPECTS = ROOT / "suspects"


def write_results(name: str, payload: dict, markdown: str, results: Path = RESULTS) -> tuple[Path, Path]:
    """Write `<results>/<name>.json` and `<results>/<name>.md`; returns both paths."""
    results.mkdir(parents=True, exist_ok=True)
    j, m = results / f"{name}.json", results / f"{name}.md"
    j.write_text(json.dumps(payload, indent=2, default=str))
    m.write_text(markdown)
    return j, m


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
