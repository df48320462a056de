"""The trigger-free evidence a sweep's winner carries into the registry, and the verdict it supports.

A defender who registers a purified model should see, beside it, what the choice rested on: the
held-out accuracy with its 95 % interval (180 held-out images measure accuracy to about +-2 points,
which is the resolution of the whole comparison), and the universal-perturbation probe
(:func:`tuning.objective.universal_flip`) on the suspect and on the winner: the class one small shared
perturbation reaches most easily, and how many held-out images it sends there. A backdoor is such a
perturbation, so a winner whose probe still reaches a class far above a clean model's level is flagged
in plain words, and ``@candidate`` does not move to it (docs/tuning.md, "The winner's evidence").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# How the evidence names what was measured and what the probe reached, per task (fip.tasks)
WORDING = {"classification": {"n": "images", "reach": "one small shared perturbation sends {share} % of the held-out "
                                                      "images to class {target}", "to": "class"},
           "causal-lm": {"n": "sequences", "reach": "two inserted soft tokens send {share} % of the held-out "
                                                        "prompts to token {target}", "to": "token"}}
# A clean model's uap_max is about 0.14 and the lab's backdoored suspects' 0.71-0.83 at the probe's radius
# (docs/tuning.md, "A trigger-free probe"); above this share a class is flagged as still easy to reach.
UAP_FLAG = 0.30
# Below this share of resamples the winner's line says its choice rests on a few held-out samples
KEPT_WARN = 0.5


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % at the default `z`); (0, 1) for no trials."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Evidence:
    """What the winner's choice rested on, measured on held-out D_val only (no trigger, no test data)."""

    holdout_acc: float
    holdout_n: int
    suspect_acc: float
    uap_max: float | None = None  # the winner's probe (None: the sweep did not run it, --objective-weight uap=0)
    uap_class: int | None = None
    suspect_uap_max: float | None = None
    suspect_uap_class: int | None = None
    flag_at: float = UAP_FLAG
    task: str = "classification"  # a language model's accuracy is a mean over sequences, its probe inserts tokens
    choice_kept: float | None = None  # share of resamples of the held-out samples the winner still wins (tuning.stability)
    resamples: int = 0

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson's interval over the samples: exact for images; for sequences (each a share in [0, 1], whose
        variance is at most p (1 - p)) it is the wider, conservative side."""
        return wilson_interval(self.holdout_acc * self.holdout_n, self.holdout_n)

    @property
    def flagged(self) -> bool:
        """The probe still finds a class that one small perturbation reaches (see the module docstring)."""
        return self.uap_max is not None and self.uap_max >= self.flag_at

    def verdict(self) -> str:
        """One plain sentence for the registry and the terminal."""
        if self.uap_max is None:
            return "not probed: the sweep ran without the universal-perturbation probe (uap weight 0)"
        words = WORDING[self.task]
        reach = words["reach"].format(share=f"{100 * self.uap_max:.0f}", target=self.uap_class)
        was = "" if self.suspect_uap_max is None else \
            f" (the suspect: {100 * self.suspect_uap_max:.0f} % to {words['to']} {self.suspect_uap_class})"
        if self.flagged:
            return (f"flagged: {reach}{was}, at or above {100 * self.flag_at:.0f} %: the backdoor may remain; "
                    "@candidate does not move to this model")
        return f"not flagged: {reach}{was}, below {100 * self.flag_at:.0f} %"

    def tags(self) -> dict[str, str]:
        """The registered version's tags (``evidence.*``)."""
        lo, hi = self.interval
        tags = {"evidence.holdout_acc": f"{self.holdout_acc:.4f}", "evidence.holdout_acc_ci95": f"[{lo:.4f}, {hi:.4f}]",
                "evidence.holdout_n": str(self.holdout_n), "evidence.suspect_holdout_acc": f"{self.suspect_acc:.4f}",
                "evidence.verdict": self.verdict()[:500], "evidence.flagged": str(self.flagged).lower()}
        for key, value in (("uap_max", self.uap_max), ("suspect_uap_max", self.suspect_uap_max),
                           ("choice_kept", self.choice_kept)):
            if value is not None:
                tags[f"evidence.{key}"] = f"{value:.4f}"
        for key, value in (("uap_class", self.uap_class), ("suspect_uap_class", self.suspect_uap_class)):
            if value is not None:
                tags[f"evidence.{key}"] = str(value)
        return tags

    def lines(self) -> list[str]:
        """The lines a sweep ends with."""
        lo, hi = self.interval
        lines = [f"held-out ACC {100 * self.holdout_acc:.2f} % (95 % interval {100 * lo:.1f}-{100 * hi:.1f} %, "
                 f"{self.holdout_n} {WORDING[self.task]['n']}; the suspect {100 * self.suspect_acc:.2f} %)",
                 f"probe: {self.verdict()}"]
        if self.choice_kept is not None:
            lines.append(f"choice: this trial still scores highest in {100 * self.choice_kept:.0f} % of "
                         f"{self.resamples} resamples of the held-out {WORDING[self.task]['n']}"
                         + (" (the choice rests on a few of them)" if self.choice_kept < KEPT_WARN else ""))
        return lines


def winner_evidence(winner: dict, suspect: dict, holdout_n: int, flag_at: float = UAP_FLAG,
                    task: str = "classification", choice_kept: float | None = None, resamples: int = 0) -> Evidence:
    """The evidence of a trial row (its last report's features) against the suspect's held-out features;
    `holdout_n`: the held-out samples its accuracy averages over (images, or a language model's sequences)."""
    def number(d: dict, key: str):
        value = d.get(key)
        return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value

    uap_class, suspect_class = number(winner, "uap_class"), number(suspect, "uap_class")
    return Evidence(float(winner["holdout_acc"]), holdout_n, float(suspect["acc"]), number(winner, "uap_max"),
                    int(uap_class) if uap_class is not None else None, number(suspect, "uap_max"),
                    int(suspect_class) if suspect_class is not None else None, flag_at, task, choice_kept, resamples)
