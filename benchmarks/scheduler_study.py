"""What early stopping does to `fip tune`'s default sweep, replayed on trials whose checkpoints were all scored.

    python -m benchmarks.tuned_table --attacks badnets --trials 8 --seed 2 --checkpoint-every 100 \\
        --baselines "" --no-defense-table --results checkpoints-badnets --threads 1     # (and blend: -blend)
    python -m benchmarks.scheduler_study checkpoints-badnets checkpoints-blend

The saved sweeps hold, for every trial, the objective (and, for the report, the test set's DER) at steps 100
and 200 and at its end. This replays Ray Tune's ASHA on them with Ray's own rules (one trial at a time, in
every order of the trials: ``ray.tune.schedulers.async_hyperband``: a trial reporting at or past a rung is
stopped when its objective is below the rung's ``1 - 1/rf`` quantile of the trials recorded there before it)
and, for each scheduler, reports the trials that finish, the cost (purify steps at each trial's own rate, plus
one probe per scored report: under ASHA every checkpoint, without a scheduler only the end) and what the
objective then chooses. Writes ``benchmarks/results/scheduler-study.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics

import numpy as np

from benchmarks.common import RESULTS, markdown_table, write_results
from tuning.report import spearman

# (name, grace period, reduction factor) of ASHA; None: no scheduler (every trial to its end)
SCHEDULERS = (("asha, grace 50, rf 2 (the old default)", 50, 2), ("asha, grace 200, rf 2", 200, 2),
              ("asha, grace 100, rf 3", 100, 3), ("none (the default)", None, None))


def rungs(grace: int, rf: int, max_t: int) -> list[int]:
    """ASHA's milestones, as Ray computes them for one bracket."""
    return [grace * rf ** k for k in range(int(math.log(max_t / grace) / math.log(rf) + 1))]


def reports(trial: dict) -> list[tuple[int, float]]:
    """(step, objective) of each report: the scored checkpoints, then the end."""
    return [(c["step"], c["objective"]) for c in trial["checkpoints"]] + [(trial["params"]["iterations"],
                                                                          trial["objective"])]


def replay(trials: list[dict], grace: int | None, rf: int | None) -> tuple[list[dict], float]:
    """(the trials that finish, the sweep's seconds) with these trials run one at a time in this order."""
    max_t = max(t["params"]["iterations"] for t in trials)
    milestones = sorted(rungs(grace, rf, max_t), reverse=True) if grace else []
    recorded: dict[int, list[float]] = {m: [] for m in milestones}
    finished, seconds = [], 0.0
    for t in trials:
        per_step, probe = t["seconds"] / t["params"]["iterations"], t["uap_seconds"]
        mine: set[int] = set()  # the rungs this trial was recorded at
        for step, objective in reports(t):
            if step >= max_t:  # the end: scored once, whatever the scheduler
                seconds += step * per_step + probe
                finished.append(t)
                break
            if not milestones:
                continue  # not scored: nothing reads it
            seconds += probe
            rung = next((m for m in milestones if step >= m), None)
            if rung is None or rung in mine:
                continue
            mine.add(rung)
            cutoff = np.nanpercentile(recorded[rung], (1 - 1 / rf) * 100) if recorded[rung] else None
            recorded[rung].append(objective)
            if cutoff is not None and objective < cutoff:
                seconds += step * per_step
                break
    return finished, seconds


def study(sweeps: list[dict], orders: int = 500, seed: int = 0) -> dict:
    rng = random.Random(seed)
    out = {"per_suspect": {}, "schedulers": {}}
    for s in sweeps:
        trials = s["trials"]
        final = [t["objective"] for t in trials]
        out["per_suspect"][s["attack"]] = {
            f"spearman_objective_at_{step}_with_end": spearman(
                [next(c["objective"] for c in t["checkpoints"] if c["step"] == step) for t in trials], final)
            for step in (100, 200)}
        out["per_suspect"][s["attack"]]["best_der"] = max(t["der"] for t in trials)
    for name, grace, rf in SCHEDULERS:
        rows = []
        for s in sweeps:
            for _ in range(orders):
                order = rng.sample(s["trials"], len(s["trials"]))
                finished, seconds = replay(order, grace, rf)
                won = max(finished, key=lambda t: t["objective"])
                rows.append({"finished": len(finished), "seconds": seconds, "der": won["der"], "asr": won["asr"],
                             "acc_drop": s["before"]["acc"] - won["acc"]})
        out["schedulers"][name] = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stems", nargs="+", help="saved sweeps in benchmarks/results (tuned_table --checkpoint-every)")
    p.add_argument("--orders", type=int, default=500, help="random orders of each sweep's trials to replay")
    args = p.parse_args(argv)
    sweeps = list(itertools.chain.from_iterable(json.loads((RESULTS / f"{stem}.json").read_text())["sweeps"]
                                                for stem in args.stems))
    found = study(sweeps, args.orders)
    table = [[name, round(r["finished"], 2), round(r["seconds"]), round(r["der"], 3), round(100 * r["asr"], 2),
              round(100 * r["acc_drop"], 2)] for name, r in found["schedulers"].items()]
    corr = [[a, *(round(v[f"spearman_objective_at_{k}_with_end"], 2) for k in (100, 200)), round(v["best_der"], 3)]
            for a, v in found["per_suspect"].items()]
    md = ("# Early stopping on the default sweep, replayed\n\nbenchmarks/scheduler_study.py on "
          f"{', '.join(args.stems)}: {len(sweeps)} sweeps of 8 trials (300 steps, checkpoints scored at 100 and 200), "
          f"each replayed in {args.orders} random orders; means over suspects and orders.\n\n"
          + markdown_table(["scheduler", "trials finished (of 8)", "sweep seconds", "chosen DER", "chosen ASR %",
                            "chosen ACC drop (points)"], table)
          + "\nHow well a checkpoint's objective ranks the trials' final objectives (Spearman):\n\n"
          + markdown_table(["suspect", "at step 100", "at step 200", "best DER in the sweep"], corr))
    write_results("scheduler-study", {"stems": args.stems, "orders": args.orders, **found}, md)
    print(md)
    return found


if __name__ == "__main__":
    main()
