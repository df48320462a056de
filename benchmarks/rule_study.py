"""Winner rules for `fip tune`, compared offline on the seeded table's sweeps (docs/tuning.md, "Round 3").

    python -m benchmarks.rule_study           # reads defenses-seeded-<dataset>.json, writes rule-study-<dataset>.*

Every `fip-tuned` cell of benchmarks/seeded_table.py keeps its whole sweep: each trial's held-out features, which
held-out images it classifies correctly, which images each class's shared perturbation moved (at the objective's
radius and at a wider one), and its test figures. A winner rule reads only the first three; so any rule can be
scored on the same trials without training again, and the held-out images can be resampled (bootstrap, paired:
one resample serves every trial and the suspect) to measure how much of a rule's choice is held-out noise.

The rules and the criterion for replacing the default were fixed before the sweeps ran (docs/tuning.md). DER,
ASR and test ACC are read only to report what each rule's picks are worth.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.seeded_table import TUNED, interval
from benchmarks.tuned_table import unpack_bits
from tuning.report import spearman
from tuning.stability import RESAMPLES, SampleRecord

# `safe-then-accurate`: a trial is as clean as the cleanest if its share to the suspect's class is within this
SAFE_MARGIN = 0.05
BOOTSTRAP = RESAMPLES  # resamples of the held-out images per sweep, as fip tune draws
DEFAULT_RULE = "der-estimate"
# issue 24's limits per attack (test set): what the trials offer, whatever a rule picks
ASR_LIMIT = 0.10
DROP_TARGET = 0.03


@dataclass
class Measured:
    """One model's held-out record (:class:`tuning.stability.SampleRecord`) at the objective's radius and at the
    wider one."""

    at: SampleRecord
    wide: SampleRecord

    @classmethod
    def from_record(cls, rec: dict, labels: np.ndarray, classes: int) -> Measured:
        n = len(labels)
        acc = unpack_bits(rec["holdout_hits"], (n,)).astype(float)
        counted = labels[None, :] != np.arange(classes)[:, None]  # an image never counts for its own class
        return cls(SampleRecord(acc, unpack_bits(rec["uap_hits"], (classes, n)), counted),
                   SampleRecord(acc, unpack_bits(rec["uap_hits_wide"], (classes, n)), counted))

    def features(self, idx: np.ndarray) -> dict:
        """Held-out ACC and every class's share on the images `idx` (a resample: indices may repeat)."""
        return {"acc": self.at.features(idx)["holdout_acc"], "rates": self.at.rates(idx),
                "rates_wide": self.wide.rates(idx)}


@dataclass
class StudySweep:
    attack: str
    seed: int
    labels: np.ndarray
    suspect: Measured
    trials: list[Measured]
    outcomes: list[dict]  # per trial, for the report only: der, asr, acc_drop

    @classmethod
    def from_row(cls, row: dict, drawn: int) -> StudySweep:
        """The sweep's first `drawn` trials: those `fip tune`'s default runs (a sweep saved with `--base-trial`
        has the job's own settings after them)."""
        sweep, trials = row["sweep"], row["trials"][:drawn]
        labels = np.array(sweep["holdout_labels"])
        classes = len(trials[0]["uap_rates"])
        return cls(row["attack"], row["seed"], labels, Measured.from_record(sweep["suspect_uap"], labels, classes),
                   [Measured.from_record(t, labels, classes) for t in trials],
                   [{"der": t["der"], "asr": t["asr"], "acc_drop": row["acc_before"] - t["acc"]} for t in trials])

    def view(self, idx: np.ndarray) -> tuple[dict, list[dict]]:
        return self.suspect.features(idx), [t.features(idx) for t in self.trials]


def _drop(s: dict, t: dict) -> float:
    return max(0.0, s["acc"] - t["acc"])


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties: the earlier trial


def der_estimate(s: dict, ts: list[dict]) -> list[float]:
    """The default objective: - held-out ACC lost - the largest share one perturbation sends to one class."""
    return [-_drop(s, t) - float(t["rates"].max()) for t in ts]


def suspect_class(s: dict, ts: list[dict]) -> list[float]:
    """- ACC lost - the share sent to the class the suspect's probe points at (where a backdoor that is left
    would be), not to whichever class is easiest."""
    c = int(s["rates"].argmax())
    return [-_drop(s, t) - float(t["rates"][c]) for t in ts]


def suspect_class_wide(s: dict, ts: list[dict]) -> list[float]:
    """:func:`suspect_class` with the wider probe's share (the class still the suspect's at the objective's radius)."""
    c = int(s["rates"].argmax())
    return [-_drop(s, t) - float(t["rates_wide"][c]) for t in ts]


def safe_then_accurate(s: dict, ts: list[dict]) -> list[float]:
    """Among the trials whose share to the suspect's class is within SAFE_MARGIN of the lowest, the most accurate
    (a score: accuracy, minus 1 for the trials outside)."""
    c = int(s["rates"].argmax())
    floor = min(float(t["rates"][c]) for t in ts)
    return [t["acc"] - (0.0 if float(t["rates"][c]) <= floor + SAFE_MARGIN else 1.0) for t in ts]


SCORES: dict[str, Callable[[dict, list[dict]], list[float]]] = {
    DEFAULT_RULE: der_estimate, "suspect-class": suspect_class, "suspect-class-wide": suspect_class_wide,
    "safe-then-accurate": safe_then_accurate}
RULES = (*SCORES, "bagged")  # bagged: the trial the default picks most often over the resamples


def resamples(n: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, n) for _ in range(count)]


def study_sweep(sweep: StudySweep, boot: int = BOOTSTRAP) -> dict:
    """Each rule's pick on all held-out images, its picks over `boot` paired resamples (how often it keeps its
    choice, and the mean DER of what it picks), and each scored rule's rank correlation with DER."""
    full = np.arange(len(sweep.labels))
    views = [sweep.view(idx) for idx in resamples(len(full), boot, 1000 * sweep.seed + len(sweep.attack))]
    picks = {name: [_argmax(f(*v)) for v in views] for name, f in SCORES.items()}
    default_picks = picks[DEFAULT_RULE]
    picks["bagged"] = [max(set(default_picks), key=lambda i: (default_picks.count(i), -i))] * boot
    out = {"attack": sweep.attack, "seed": sweep.seed, "rules": {}}
    der = [o["der"] for o in sweep.outcomes]
    for name in RULES:
        chosen = _argmax(SCORES[name](*sweep.view(full))) if name in SCORES else picks[name][0]
        scored = name in SCORES  # bagged's own stability would need a bootstrap inside each resample
        out["rules"][name] = {"trial": chosen, **sweep.outcomes[chosen],
                              "kept": sum(p == chosen for p in picks[name]) / boot if scored else None,
                              "der_over_resamples": statistics.mean(der[p] for p in picks[name]) if scored else None,
                              "spearman": spearman(SCORES[name](*sweep.view(full)), der) if scored else None}
    out["oracle_der"] = max(der)
    # the least ACC drop of a trial under the ASR limit: where it exceeds the target, no rule can meet it here
    out["least_drop_under_limit"] = min((o["acc_drop"] for o in sweep.outcomes if o["asr"] <= ASR_LIMIT), default=None)
    return out


def summarise(studied: list[dict], variants: list[dict], dataset: str, results: Path) -> dict:
    """Per rule: the means of its picks over the sweeps, its paired DER difference to the default (interval over
    sweeps), how often it keeps its pick when the held-out images are resampled; the variants apart."""
    def block(rows: list[dict]) -> dict:
        out = {}
        for name in RULES:
            picked = [r["rules"][name] for r in rows]
            attacks = sorted({r["attack"] for r in rows})
            worst = max(attacks, key=lambda a: statistics.mean(r["rules"][name]["asr"] for r in rows if r["attack"] == a))
            out[name] = {"der": statistics.mean(p["der"] for p in picked),
                         "asr": statistics.mean(p["asr"] for p in picked),
                         "acc_drop": statistics.mean(p["acc_drop"] for p in picked),
                         "worst_attack": worst,
                         "worst_asr": statistics.mean(r["rules"][name]["asr"] for r in rows if r["attack"] == worst),
                         **{k: statistics.mean(p[k] for p in picked) if name in SCORES else None
                            for k in ("kept", "der_over_resamples", "spearman")},
                         "vs_default": interval([r["rules"][name]["der"] - r["rules"][DEFAULT_RULE]["der"] for r in rows])}
        return out

    main = block(studied) if studied else {}
    side = block(variants) if variants else {}

    def table(b: dict) -> str:
        return markdown_table(
            ["rule", "DER", "ASR %", "ACC drop (points)", "worst attack's ASR %", "DER minus the default's [95 %]",
             "pick kept over resamples", "DER over resamples", "Spearman with DER"],
            [[n, f"{v['der']:.3f}", round(100 * v["asr"], 2), round(100 * v["acc_drop"], 2),
              f"{100 * v['worst_asr']:.1f} ({v['worst_attack']})",
              "{:.3f} [{:.3f}, {:.3f}]".format(*v["vs_default"]),
              "-" if v["kept"] is None else f"{100 * v['kept']:.0f} %",
              "-" if v["der_over_resamples"] is None else f"{v['der_over_resamples']:.3f}",
              "-" if v["spearman"] is None else round(v["spearman"], 2)]
             for n, v in b.items()])

    oracle = statistics.mean(r["oracle_der"] for r in studied) if studied else float("nan")
    reach = sum(r["least_drop_under_limit"] is not None and r["least_drop_under_limit"] <= DROP_TARGET for r in studied)

    def least(r: dict) -> str:
        d = r["least_drop_under_limit"]
        return "none" if d is None else f"{100 * d:.2f} points"

    md = (f"# Winner rules on the seeded table's sweeps ({dataset})\n\n"
          f"benchmarks/rule_study.py: {len(studied)} sweeps of the lab's attacks"
          f"{f' and {len(variants)} of the variants' if variants else ''}, each rule's pick read from the same "
          f"trials; {BOOTSTRAP} paired resamples of the held-out images per sweep. The best trial per sweep, read "
          f"from the test set (no rule can): DER {oracle:.3f}. {reach} of {len(studied)} sweeps hold a trial under "
          f"{100 * ASR_LIMIT:.0f} % ASR that loses at most {100 * DROP_TARGET:.0f} points of ACC (per sweep below: "
          f"the least ACC drop under that ASR). Rules and criterion: docs/tuning.md, \"Round 3\".\n\n"
          + "".join(f"- {r['attack']} (seed {r['seed']}): " + ", ".join(
              f"{name} trial {v['trial']} (DER {v['der']:.3f}, ASR {100 * v['asr']:.1f} %)" for name, v in r["rules"].items())
              + f"; best {r['oracle_der']:.3f}; least ACC drop under {100 * ASR_LIMIT:.0f} % ASR {least(r)}\n"
              for r in (*studied, *variants)) + "\n"
          + ("## The lab's attacks\n\n" + table(main) if main else "")
          + ("\n## The variants (no default was chosen on them)\n\n" + table(side) if side else ""))
    payload = {"dataset": dataset, "bootstrap": BOOTSTRAP, "safe_margin": SAFE_MARGIN, "sweeps_within_targets": reach,
               "sweeps": studied,
               "variant_sweeps": variants, "main": main, "variants": side}
    write_results(f"rule-study-{dataset}", payload, md, results)
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    table = json.loads((Path(args.results) / f"defenses-seeded-{args.dataset}.json").read_text())
    rows = [r for r in table["rows"] if r["defense"] == TUNED and "sweep" in r]
    if not rows:
        raise SystemExit("no fip-tuned cell with its sweep's study record yet: run benchmarks.seeded_table first")
    studied = [study_sweep(StudySweep.from_row(r, table["meta"]["trials"])) for r in rows]
    main_attacks = set(table["attacks"])
    return summarise([s for s in studied if s["attack"] in main_attacks],
                     [s for s in studied if s["attack"] not in main_attacks], args.dataset, Path(args.results))


if __name__ == "__main__":
    main()
