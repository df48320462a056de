"""A sweep's results as a table and a plot, and the rank correlation that validates the objective."""

from __future__ import annotations

import math
from pathlib import Path

# what each trial reports beside its objective; `uap_max` only when the objective weighs the probe
FEATURES = ("holdout_acc", "agreement", "kl_to_suspect", "trace_ratio", "uap_max")


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); NaN when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(list(a)), _ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def trial_table(trials: list[dict], columns: list[str]) -> str:
    """Markdown: one row per trial, the given columns (missing values as '-')."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(t.get(c)) for c in columns) + " |" for t in trials]
    return "\n".join(lines) + "\n"


def plot_objective_vs_der(trials: list[dict], out: Path, winner: str | None = None) -> Path | None:
    """Objective against DER, one point per trial (benchmark mode); None when no trial has a DER."""
    points = [(t["objective"], t["der"], t.get("trial_id")) for t in trials
              if t.get("objective") is not None and t.get("der") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=20)
    for obj, der, tid in points:
        if tid == winner:
            ax.scatter([obj], [der], s=80, facecolors="none", edgecolors="red", label="chosen")
    rho = spearman([p[0] for p in points], [p[1] for p in points])
    ax.set_xlabel("defender objective (held-out D_val)")
    ax.set_ylabel("DER (test set, benchmark mode)")
    ax.set_title(f"{len(points)} trials, Spearman {rho:.2f}")
    if winner:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
