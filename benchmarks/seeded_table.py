"""The defense table with seeds: every defense, FIP tuned included, on one set of suspects, each cell repeated
with several seeds of the defense and of D_val, reported as means with 95 % intervals.

    python -m benchmarks.seeded_table                    # 8 attacks x 10 defenses x 3 seeds, 2 processes
    python -m benchmarks.seeded_table --resume           # go on where a stopped run ended
    python -m benchmarks.seeded_table --resummarise      # the tables again, from the saved cells

One cell is (attack, seed, defense). Seed `s` draws the defender's D_val (600 images of the training set,
class-balanced: ``lab.datasets.clean_split``) and seeds the defense; the suspect is the same for every seed:
the committed one in ``benchmarks/suspects/lab`` (the lab makes a missing one there, to be committed too). `fip-tuned` is the model `fip tune`'s default sweep chooses: 8 trials
of the default space in-process (:func:`benchmarks.tuned_table.sweep_attack`), split and trials seeded by `s`,
chosen by the trigger-free objective on the held-out share; its seconds are the whole sweep's. Every other row
runs the defense table's settings (:data:`lab.defenses.DEFENSES`).

Cells run in `--procs` processes of one torch thread each and are saved as each one ends, so a stopped run
resumes at the next cell. Writes ``benchmarks/results/defenses-seeded-<dataset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from benchmarks.common import RESULTS, SUSPECTS, markdown_table, write_results
from benchmarks.defense_table import VARIANTS, lab_config
from lab.attacks import ATTACKS
from lab.backdoor import make_backdoored_model, versions
from lab.defenses import DEFENSES

TUNED = "fip-tuned"
ROWS = (*DEFENSES, TUNED)
# The rows run on the variants (benchmarks.defense_table.VARIANTS): does fip-tuned's default hold on attacks no
# setting was chosen on, against fine-tuning and the two strongest rows of the lab's attacks
VARIANT_ROWS = ("ft", "ft-sam", "fst", "fip", TUNED)


@dataclass(frozen=True)
class Cell:
    attack: str
    seed: int
    defense: str

    @property
    def key(self) -> str:
        return f"{self.attack}/{self.seed}/{self.defense}"


@dataclass(frozen=True)
class Budget:
    """How much each cell runs: the full table's, or a smaller one for tests (`steps` for every defense,
    `trials` and `iterations` for the sweep; `base_trial`: the sweep also runs PurifyConfig's own settings, as
    `fip tune --base-trial` does)."""

    steps: int | None = None
    trials: int = 8
    iterations: int | None = None
    quick: bool = False
    base_trial: bool = False

    def space(self):
        """fip tune's default space, at this budget's iterations when it sets them."""
        from tuning.space import SearchSpace

        space = SearchSpace.default()
        return space.with_flags([f"iterations={self.iterations}"]) if self.iterations else space


@lru_cache(maxsize=2)
def _setup(attack: str, dataset: str, seed: int, quick: bool, cache: str) -> tuple:
    """One suspect and one seed's D_val, kept while a process runs that seed's cells of that attack."""
    from benchmarks.tuned_table import lab_setup

    return lab_setup(attack, dataset, Path(cache), False, lab_config(attack, quick, dataset), seed)


def run_cell(cell: Cell, dataset: str, budget: Budget, cache: str, saved: dict | None = None) -> dict:
    """One cell's row: the defended model's ACC/ASR/RA/DER on the test set, beside the suspect's. `saved`: this
    fip-tuned cell's row from before its sweep gained the base trial; its trials are kept and only that one runs."""
    import torch

    from lab.defenses import CleanSet, run_defense
    from lab.metrics import defense_effectiveness_rating, evaluate_model

    torch.set_num_threads(1)
    if cell.defense == TUNED:  # the sweep loads the suspect and this seed's D_val itself
        return _tuned(cell, dataset, budget, cache, saved)
    suspect, attack, x, y, xt, yt, before = _setup(cell.attack, dataset, cell.seed, budget.quick, cache)
    row = _row_head(cell, before)
    torch.manual_seed(cell.seed)  # the defenses that draw from torch's global generator (pruning masks' noise)
    res = run_defense(cell.defense, suspect, CleanSet(x, y),
                      {"seed": cell.seed, **({"steps": budget.steps} if budget.steps else {})})
    after = evaluate_model(res.model, xt, yt, attack.trigger_floats, attack.target_of)
    der = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
    return {**row, "acc": after["acc"], "asr": after["asr"], "ra": after["ra"], "der": der, "seconds": res.seconds}


def _row_head(cell: Cell, before: dict) -> dict:
    """What every row starts with: the cell, and the suspect's test ACC and ASR."""
    return {"attack": cell.attack, "seed": cell.seed, "defense": cell.defense, "acc_before": before["acc"],
            "asr_before": before["asr"]}


def _tuned(cell: Cell, dataset: str, budget: Budget, cache: str, saved: dict | None = None) -> dict:
    """`fip tune`'s default sweep on this seed's D_val, in-process: the chosen trial's figures, the sweep's cost.
    `saved`: an earlier row of this cell, whose trials the sweep keeps (they are checked against its plan)."""
    from benchmarks.tuned_table import choose, sweep_attack, sweep_seconds
    from tuning.objective import ObjectiveWeights
    from tuning.report import spearman

    space = budget.space()
    weights = ObjectiveWeights()
    done = None if saved is None else {
        "before": {"acc": saved["acc_before"], "asr": saved["asr_before"]},
        "holdout_size": saved["sweep"]["holdout_size"], "trials": saved["trials"]}
    sweep = sweep_attack(cell.attack, budget.trials, dataset, 0.3, cell.seed, space, Path(cache), weights,
                         progress=False, cfg=lab_config(cell.attack, budget.quick, dataset), dval_seed=cell.seed,
                         study=True, done=done, base_trial=budget.base_trial)
    won = choose(sweep, weights)
    trials = sweep["trials"]
    return {**_row_head(cell, sweep["before"]), "acc": won["acc"], "asr": won["asr"], "ra": won["ra"],
            "der": won["der"], "seconds": sweep_seconds(sweep),
            "chosen": {"trial": won["trial"], "params": won["params"], "holdout_acc": won["holdout_acc"],
                       "uap_max": won["uap_max"]},
            "best_der": max(t["der"] for t in trials),
            "spearman": spearman([t["objective"] for t in trials], [t["der"] for t in trials]),
            # every trial's features, per-image hits included, and the suspect's: another winner rule can be
            # scored on these sweeps offline (docs/tuning.md, "Round 3")
            "trials": [{k: v for k, v in t.items() if k != "checkpoints"} for t in trials],
            "sweep": {k: sweep[k] for k in ("suspect_holdout", "suspect_uap", "holdout_labels", "holdout_size",
                                            "train_size")}}


def interval(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): the 95 % Student-t interval of the mean (a single value: no width)."""
    from scipy.stats import t

    m = statistics.mean(values)
    if len(values) < 2:
        return m, m, m
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def summarise(all_rows: list[dict], dataset: str, seeds: list[int], attacks: list[str], meta: dict) -> dict:
    """Per defense, each seed's mean over the attacks, then the mean over seeds with its interval; the paired
    difference of every defense to fip-tuned, seed by seed; the per-attack means; and the variants' rows
    (any attack not in `attacks`), each with its interval over seeds, outside the means."""
    rows = [r for r in all_rows if r["attack"] in attacks]
    defenses = [d for d in ROWS if any(r["defense"] == d for r in rows)]
    complete = {d: [s for s in seeds if all(any(r["defense"] == d and r["seed"] == s and r["attack"] == a for r in rows)
                                            for a in attacks)] for d in defenses}

    def per_seed(d: str, key) -> dict[int, float]:
        return {s: statistics.mean(key(r) for r in rows if r["defense"] == d and r["seed"] == s) for s in complete[d]}

    measures = {"der": lambda r: r["der"], "acc_drop": lambda r: r["acc_before"] - r["acc"], "asr": lambda r: r["asr"],
                "seconds": lambda r: r["seconds"]}
    means = {}
    for d in defenses:
        if not complete[d]:
            continue
        means[d] = {name: interval(list(per_seed(d, key).values())) for name, key in measures.items()}
        by_attack = {a: statistics.mean(r["asr"] for r in rows if r["defense"] == d and r["attack"] == a
                                        and r["seed"] in complete[d]) for a in attacks}
        worst = max(by_attack, key=by_attack.get)
        means[d]["worst_asr"] = (worst, by_attack[worst])
        means[d]["seeds"] = complete[d]
    ranked = sorted(means, key=lambda d: -means[d]["der"][0])
    paired = {}
    if TUNED in means:
        mine = per_seed(TUNED, measures["der"])
        for d in ranked:
            theirs = per_seed(d, measures["der"])
            shared = [s for s in mine if s in theirs]
            if d != TUNED and shared:
                paired[d] = interval([mine[s] - theirs[s] for s in shared])
    per_attack = []
    for a in attacks:
        for d in defenses:
            cell = [r for r in rows if r["attack"] == a and r["defense"] == d]
            if cell:
                per_attack.append([a, d, *(round(100 * statistics.mean(r[k] for r in cell), 2) for k in ("acc", "asr")),
                                   round(statistics.mean(r["der"] for r in cell), 3), len(cell)])

    def ci(v: tuple, scale: float = 1.0, digits: int = 3) -> str:
        return f"{scale * v[0]:.{digits}f} [{scale * v[1]:.{digits}f}, {scale * v[2]:.{digits}f}]"

    table = [[d, ci(means[d]["der"]), ci(means[d]["acc_drop"], 100, 2), ci(means[d]["asr"], 100, 2),
              f"{100 * means[d]['worst_asr'][1]:.1f} ({means[d]['worst_asr'][0]})", round(means[d]["seconds"][0], 1),
              len(means[d]["seeds"])] for d in ranked]
    diff = [[d, ci(v)] for d, v in paired.items()]
    variants = {}
    for a in dict.fromkeys(r["attack"] for r in all_rows if r["attack"] not in attacks):
        for d in ROWS:
            cell = [r for r in all_rows if r["attack"] == a and r["defense"] == d]
            if cell:
                variants[f"{a}/{d}"] = {"attack": a, "defense": d, "seeds": sorted(r["seed"] for r in cell),
                                        **{name: interval([key(r) for r in cell]) for name, key in measures.items()}}
    variant_table = [[v["attack"], v["defense"], ci(v["der"]), ci(v["acc_drop"], 100, 2), ci(v["asr"], 100, 2),
                      round(v["seconds"][0], 1), len(v["seeds"])] for v in variants.values()]
    md = (f"# Defenses on {dataset}, {len(seeds)} seeds per cell\n\n"
          f"benchmarks/seeded_table.py. One set of suspects (the lab's cached models); seed s draws the defender's "
          f"D_val (600 training images) and seeds the defense; fip-tuned is the model fip tune's default sweep "
          f"chooses ({meta.get('trials', 8)} trials in-process, chosen on the held-out share of D_val; its seconds "
          f"are the whole sweep's). Attacks: {', '.join(attacks)}. Seeds: {', '.join(map(str, seeds))}. "
          f"{meta.get('procs', 2)} processes of 1 torch thread; wall {meta.get('wall_s', 0):.0f} s for the cells "
          f"this invocation ran; {len(rows)} cells saved, {sum(r['seconds'] for r in rows):.0f} s of defense and "
          f"sweep time between them (one process each; a resumed table spans several invocations).\n\n"
          "## Means over the attacks, with 95 % intervals over seeds\n\n"
          "Each seed's mean over the attacks, then the mean of those over seeds and its Student-t interval.\n\n"
          + markdown_table(["defense", "DER", "ACC drop (points)", "ASR %", "worst attack's ASR % (mean over seeds)",
                            "seconds", "seeds"], table)
          + ("\n## fip-tuned minus each defense, DER, paired by seed\n\n"
             + markdown_table(["defense", "difference [95 % interval]"], diff) if diff else "")
          + "\n## Per attack, means over seeds\n\n"
          + markdown_table(["attack", "defense", "ACC %", "ASR %", "DER", "seeds"], per_attack)
          + ("\n## Variants: attacks no default was chosen on (outside the means above)\n\n"
             + "".join(f"- `{a}`: {VARIANTS[a].name}, target {VARIANTS[a].target}, {json.dumps(VARIANTS[a].params)}"
                       f"{f', attack seed {VARIANTS[a].seed}' if VARIANTS[a].seed else ''}\n"
                       for a in dict.fromkeys(v["attack"] for v in variants.values()) if a in VARIANTS)
             + "\nMeans over seeds with 95 % intervals.\n\n"
             + markdown_table(["variant", "defense", "DER", "ACC drop (points)", "ASR %", "seconds", "seeds"],
                              variant_table) if variant_table else ""))
    payload = {"dataset": dataset, "seeds": seeds, "attacks": attacks, "meta": meta, "rows": all_rows,
               "means": means, "paired_with_tuned": paired, "ranked": ranked, "variants": variants,
               "versions": versions()}
    write_results(f"defenses-seeded-{dataset}", payload, md, Path(meta.get("results", RESULTS)))
    return payload


def pending(cells: Iterable[Cell], rows: list[dict], budget: Budget) -> list[tuple[Cell, dict | None]]:
    """The cells to run, each with its saved row when there is one to complete: a fip-tuned row whose sweep has
    fewer trials than the budget plans (saved before `--base-trial` was asked for) runs the missing ones only."""
    done = {Cell(r["attack"], r["seed"], r["defense"]).key: r for r in rows}
    planned = budget.trials + _base_trials(budget)
    out = []
    for c in cells:
        row = done.get(c.key)
        if row is None:
            out.append((c, None))
        elif c.defense == TUNED and "sweep" in row and len(row["trials"]) < planned:
            out.append((c, row))
    return out


def _base_trials(budget: Budget) -> int:
    """1 when the budget asks for the base trial and the space holds PurifyConfig's own settings, else 0."""
    return int(budget.base_trial and budget.space().own_point()[0] is not None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"attacks no default was chosen on, reported apart, with the rows {', '.join(VARIANT_ROWS)} "
                        "only ('' for none)")
    p.add_argument("--defenses", default=",".join(ROWS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--procs", type=int, default=2, help="processes at once, one torch thread each")
    p.add_argument("--resume", action="store_true", help="keep the saved cells and run the missing ones")
    p.add_argument("--resummarise", action="store_true", help="only rewrite the tables from the saved cells")
    p.add_argument("--quick", action="store_true", help="the lab's quick suspects (tests)")
    p.add_argument("--steps", type=int, default=None, help="every defense's step budget (tests)")
    p.add_argument("--trials", type=int, default=8, help="the fip-tuned sweep's trials")
    p.add_argument("--iterations", type=int, default=None, help="the fip-tuned sweep's iterations (tests)")
    p.add_argument("--base-trial", action="store_true",
                   help="the fip-tuned sweep also runs PurifyConfig's own settings, as `fip tune --base-trial`")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--cache", default=str(SUSPECTS),
                   help="where the suspects are (made there when missing; default: the committed set)")
    args = p.parse_args(argv)
    attacks, seeds = args.attacks.split(","), [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [d for d in args.defenses.split(",") if d not in ROWS]
    if unknown:
        raise SystemExit(f"unknown defense {unknown[0]!r}; known: {', '.join(ROWS)}")
    strange = [v for v in variants if v not in VARIANTS]
    if strange:
        raise SystemExit(f"unknown variant {strange[0]!r}; known: {', '.join(VARIANTS)}")
    saved = Path(args.results) / f"defenses-seeded-{args.dataset}.json"
    rows = json.loads(saved.read_text())["rows"] if (args.resume or args.resummarise) and saved.is_file() else []
    budget = Budget(args.steps, args.trials, args.iterations, args.quick, args.base_trial)
    meta = {"procs": args.procs, "trials": args.trials, "budget": vars(args), "results": args.results}
    cells = [Cell(a, s, d) for s in seeds for a in attacks for d in args.defenses.split(",")]
    cells += [Cell(v, s, d) for s in seeds for v in variants for d in args.defenses.split(",") if d in VARIANT_ROWS]
    todo = [] if args.resummarise else pending(cells, rows, budget)
    start = time.perf_counter()
    if todo:
        # the suspects are made once, here, before processes share the cache
        for a in dict.fromkeys(c.attack for c, _ in todo):
            make_backdoored_model(lab_config(a, args.quick, args.dataset), Path(args.cache) / "lab")
        print(f"[seeded table] {len(todo)} of {len(cells)} cells to run in {args.procs} processes", flush=True)
        # spawned, not forked: a fork of a process whose torch thread pool is running can hang in OpenMP
        with ProcessPoolExecutor(args.procs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_cell, c, args.dataset, budget, args.cache, saved): (c, saved)
                       for c, saved in todo}
            for n, f in enumerate(as_completed(futures), 1):
                row = f.result()
                cell, saved = futures[f]
                rows = [r for r in rows if r is not saved] + [row]  # a completed sweep replaces its earlier row
                meta["wall_s"] = time.perf_counter() - start
                summarise(rows, args.dataset, seeds, attacks, meta)
                print(f"[seeded table] {n}/{len(todo)} {cell.key}: ACC {100 * row['acc']:.2f} "
                      f"ASR {100 * row['asr']:.2f} DER {row['der']:.3f} {row['seconds']:.0f}s", flush=True)
    meta["wall_s"] = time.perf_counter() - start
    return summarise(rows, args.dataset, seeds, attacks, meta)


if __name__ == "__main__":
    main()
