"""Validate the defender's sweep objective, and FIP tuned by it as a row of the defense table.

    python -m benchmarks.tuned_table                      # every lab attack, 10 trials each
    python -m benchmarks.tuned_table --attacks badnets,blend --trials 6

For each backdoored model of the lab (the same cached models and D_val as benchmarks/defense_table.py),
a sweep of FIP trials over the default search space (tuning/space.py): each trial fine-tunes on the
``dval-train`` share of D_val, the objective (tuning/objective.py) scores it on the ``dval-holdout``
share, and ACC/ASR/RA/DER are measured on the test set for the report only. The winner is the
argmax of the objective, chosen without the trigger.

Trials run in-process with :func:`fip.purify.purify` (the same loop the Ray Train stage runs), not
through Ray Tune and Ray Train: eight sweeps through Ray on 2 cores would not fit the time. The
objective code is the one `fip tune` uses.

Writes ``benchmarks/results/tuned-<dataset>.{json,md}`` (every trial, Spearman rank correlation of the
objective and of each feature with DER, per attack and pooled) and adds a ``fip-tuned`` row to
``defenses-<dataset>.{json,md}``: per attack the chosen trial, with the whole sweep's seconds.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from benchmarks.common import CACHE, RESULTS, markdown_table, write_results
from fip.purify import PurifyConfig, purify
from fip.training import derive_seed
from lab.attacks import ATTACKS
from lab.backdoor import LabConfig, attack_from_record, load_lab_model, make_backdoored_model, versions
from lab.datasets import CleanSplit, clean_split, load_dataset
from lab.metrics import defense_effectiveness_rating, evaluate_model
from tuning.holdout import split_dval
from tuning.objective import (
    A_PRIORI_WEIGHTS,
    CANDIDATE_WEIGHTS,
    Holdout,
    ObjectiveWeights,
    measure,
    score,
    scored_logits,
    uap_radius,
    universal_flip,
)
from tuning.report import FEATURES, spearman
from tuning.space import SearchSpace

# each other weighting (tuning.objective.CANDIDATE_WEIGHTS) is reported beside the default objective
UAP_FEATURES = ("uap_max", "uap_gap")
COLUMNS = ("objective", "objective_a_priori", *(f"objective_{name}" for name in CANDIDATE_WEIGHTS),
           *(f for f in FEATURES if f not in UAP_FEATURES))


# A second, wider probe that only a study of winner rules records (the objective's radius is tuning.objective's
# UAP_RELATIVE_RADIUS): at 6 % the probe can miss what is left of a large trigger such as Blend's (docs/tuning.md)
WIDE_RELATIVE_RADIUS = 0.10


def pack_bits(bits) -> str:
    """A boolean tensor as hex (8 per byte, row-major): a study's per-image hits, small enough for the JSON."""
    import numpy as np

    return np.packbits(bits.flatten().numpy().astype(bool)).tobytes().hex()


def unpack_bits(text: str, shape: tuple[int, ...]):
    """:func:`pack_bits` back to a boolean array of `shape`."""
    import numpy as np

    count = int(np.prod(shape))
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:count].astype(bool).reshape(shape)


def uap_features(model, x, y, study: bool = False) -> dict:
    """The probe's features of one model; with `study`, also what a study of winner rules re-scores offline:
    every class's share and per-image hits at the objective's radius and at :data:`WIDE_RELATIVE_RADIUS`, and
    which held-out images the model classifies correctly."""
    r = universal_flip(model, x, y, uap_radius(x))
    out = {"uap_max": r["uap_max"], "uap_gap": r["uap_max"] - r["uap_median"], "uap_class": r["uap_class"]}
    if study:
        wide = universal_flip(model, x, y, uap_radius(x, WIDE_RELATIVE_RADIUS))
        logits, targets = scored_logits(model, x, y)
        out.update(uap_rates=r["uap_rates"], uap_hits=pack_bits(r["uap_hits"]), uap_rates_wide=wide["uap_rates"],
                   uap_hits_wide=pack_bits(wide["uap_hits"]), holdout_hits=pack_bits(logits.argmax(1) == targets))
    return out


def lab_setup(attack_name: str, dataset: str, cache: Path, progress: bool = True, cfg: LabConfig | None = None,
              dval_seed: int | None = None) -> tuple:
    """The cached suspect of one lab attack (trained on first use), its attack, D_val as floats, the test set
    and the suspect's ACC/ASR/RA on it: by default the same models and D_val as benchmarks/defense_table.py;
    `cfg` makes another suspect (another architecture: benchmarks/families_table.py), its test set cut to
    `cfg.test_limit` like the record's. `dval_seed`: another defender's D_val of the same size, drawn from the
    training set with that seed (the suspect stays the same; benchmarks/seeded_table.py)."""
    from benchmarks.defense_table import lab_config

    cfg = cfg or lab_config(attack_name, False, dataset)
    art = make_backdoored_model(cfg, cache / "lab", progress=progress)
    suspect = load_lab_model(art.model_path)
    attack = attack_from_record(art.record)
    train = load_dataset(dataset, "train")
    rows = (CleanSplit.load(art.dval_path) if dval_seed is None
            else clean_split(train, cfg.clean_fraction, dval_seed, dataset)).indices
    dval = train.subset(rows)
    test = load_dataset(dataset, "test")
    if cfg.test_limit:
        test = test.subset(range(min(cfg.test_limit, len(test))))
    xt, yt = test.floats(), test.y
    before = evaluate_model(suspect, xt, yt, attack.trigger_floats, attack.target_of)
    return suspect, attack, dval.floats(), dval.y, xt, yt, before


def refit_chosen(sweep: dict, trials: list[dict], dataset: str, cache: Path, seed: int, progress: bool = True) -> dict:
    """Re-run the chosen trials' settings (and seeds) on the whole of D_val: the held-out share is needed
    only to choose, so the final model may learn from it too. Trigger-free: the settings come from the
    choice, the data from D_val; the test set only reports."""
    suspect, attack, x, y, xt, yt, before = lab_setup(sweep["attack"], dataset, cache, progress)
    out = {}
    for t in trials:
        if str(t["trial"]) in out:
            continue
        pcfg = PurifyConfig(**{**t["params"], "seed": derive_seed(seed, "trial", t["trial"]) % 2**31})
        start = time.perf_counter()
        res = purify(suspect, x, y, pcfg)
        seconds = time.perf_counter() - start
        after = evaluate_model(res.model, xt, yt, attack.trigger_floats, attack.target_of)
        der = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
        out[str(t["trial"])] = {"acc": after["acc"], "asr": after["asr"], "ra": after["ra"], "der": der,
                                "seconds": seconds}
        if progress:
            print(f"{sweep['attack']:>12} refit trial {t['trial']:2d} on all of D_val: ACC {100 * after['acc']:5.2f} "
                  f"ASR {100 * after['asr']:6.2f} DER {der:.3f} {seconds:5.1f}s", flush=True)
    return out


def sweep_attack(attack_name: str, trials: int, dataset: str, holdout_fraction: float, seed: int,
                 space: SearchSpace, cache: Path, weights: ObjectiveWeights, progress: bool = True,
                 on_trial=None, cfg: LabConfig | None = None, done: dict | None = None,
                 checkpoint_every: int = 0, dval_seed: int | None = None, study: bool = False,
                 base_trial: bool = False) -> dict:
    """`trials` FIP trials of `space` on one suspect (:func:`lab_setup`; `cfg`: another architecture's). The
    trials' settings depend on `seed` and `attack_name` only, so every architecture sees the same ones.
    `done`: an earlier, stopped sweep of this suspect; its trials are kept when the suspect measures the same
    (a retrained suspect that differs starts afresh), so a long sweep resumes where it stopped.
    `checkpoint_every`: also score every this many steps the model as it stands then (the objective, and the
    test set for the report), as `fip tune`'s intermediate reports do: what a scheduler stops trials on.
    `dval_seed`: another draw of D_val (:func:`lab_setup`). `study`: every trial and the suspect also record
    what a study of winner rules needs (:func:`uap_features`); the held-out labels are saved beside them.
    `base_trial`: after the drawn trials, one more with PurifyConfig's own settings (the job's, as `fip tune`
    runs them first: :meth:`tuning.space.SearchSpace.base_point`), when the space holds them."""
    suspect, attack, x, y, xt, yt, before = lab_setup(attack_name, dataset, cache, progress, cfg, dval_seed)
    train_rows, held_rows = split_dval(y, holdout_fraction, seed)
    t0 = time.perf_counter()
    holdout = Holdout.from_suspect(suspect, x[held_rows], y[held_rows])
    holdout_seconds = time.perf_counter() - t0
    suspect_uap = uap_features(suspect, x[held_rows], y[held_rows], study)
    rng = random.Random(derive_seed(seed, "trials", attack_name))
    plan = [space.sample(rng) for _ in range(trials)]
    point, _outside = space.own_point() if base_trial else (None, "")
    if point is not None:
        plan.append({**point, **space.fixed})
    # a saved sweep is kept when its suspect measures the same (its test ACC and ASR) on the same held-out size
    same = (done is not None and all(done.get("before", {}).get(k) == before[k] for k in ("acc", "asr"))
            and done.get("holdout_size") == len(held_rows))
    rows: list[dict] = list(done["trials"][: len(plan)]) if same else []
    sweep = {"attack": attack_name, "before": before, "suspect_holdout": holdout.suspect, "trials": rows,
             "suspect_uap": suspect_uap, **({"holdout_labels": y[held_rows].tolist()} if study else {}),
             "holdout_size": len(held_rows), "train_size": len(train_rows), "holdout_seconds": holdout_seconds}
    for i, params in enumerate(plan):
        if i < len(rows):
            if rows[i]["params"] != params:
                raise ValueError(f"{attack_name}: saved trial {i} was drawn from another space or seed; "
                                 "run without resuming")
            continue
        pcfg = PurifyConfig(**{**params, "seed": derive_seed(seed, "trial", i) % 2**31, "eval_every": checkpoint_every})
        checkpoints: list[dict] = []
        steps = iter(range(0, pcfg.iterations, checkpoint_every or pcfg.iterations))

        def score_checkpoint(model, steps=steps, checkpoints=checkpoints) -> dict:
            step = next(steps, None)  # purify evaluates at 0, every eval_every steps, and at the end
            if not step:  # the suspect, or the final model (scored below like every trial's)
                return {}
            start = time.perf_counter()
            found = {**measure(model, holdout), **uap_features(model, x[held_rows], y[held_rows])}
            found["objective"] = score(found, holdout.suspect, weights)
            at = evaluate_model(model, xt, yt, attack.trigger_floats, attack.target_of)  # reporting only
            checkpoints.append({"step": step, **found, "acc": at["acc"], "asr": at["asr"],
                                "der": defense_effectiveness_rating(before["acc"], before["asr"], at["acc"], at["asr"]),
                                "seconds": time.perf_counter() - start})
            return {}

        t = time.perf_counter()
        res = purify(suspect, x[train_rows], y[train_rows], pcfg, evaluate=score_checkpoint if checkpoint_every else None)
        feats = measure(res.model, holdout)
        seconds = time.perf_counter() - t - sum(c.get("seconds", 0.0) for c in checkpoints)
        t = time.perf_counter()
        feats.update(uap_features(res.model, x[held_rows], y[held_rows], study))  # once, for every weighting
        uap_seconds = time.perf_counter() - t
        feats["objective"] = score(feats, holdout.suspect, weights)
        after = evaluate_model(res.model, xt, yt, attack.trigger_floats, attack.target_of)  # reporting only
        der = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
        rows.append({"trial": i, "params": params, **feats, "acc": after["acc"], "asr": after["asr"],
                     "ra": after["ra"], "der": der, "seconds": seconds,
                     "uap_seconds": uap_seconds, **({"checkpoints": checkpoints} if checkpoint_every else {})})
        if progress:
            print(f"{attack_name:>12} trial {i:2d} {params['method']:>8} it {params['iterations']:3d} "
                  f"obj {feats['objective']:+.4f} hacc {100 * feats['holdout_acc']:5.1f} agr {100 * feats['agreement']:5.1f} "
                  f"kl {feats['kl_to_suspect']:.3f} tr {feats['trace_ratio']:.3f} "
                  f"uap {feats['uap_max']:.2f} ({feats['uap_class']}) | ACC {100 * after['acc']:5.2f} "
                  f"ASR {100 * after['asr']:6.2f} DER {der:.3f} {seconds:5.1f}s", flush=True)
        if on_trial is not None:
            on_trial(sweep)  # a long run that is stopped keeps its finished trials
    return sweep


def run_baselines(attack_name: str, names: list[str], dataset: str, cache: Path, progress: bool = True,
                  cfg: LabConfig | None = None, settings: dict | None = None) -> dict:
    """The table's defenses on exactly this sweep's suspect and full D_val (the cached models can differ from
    the ones the defense table measured); `cfg`: another architecture's suspect (:func:`lab_setup`);
    `settings`: FinetuneSettings overrides (a smaller step budget)."""
    import torch

    from lab.defenses import CleanSet, run_defense

    suspect, attack, x, y, xt, yt, before = lab_setup(attack_name, dataset, cache, progress, cfg)
    out = {}
    for name in names:
        torch.manual_seed(0)
        res = run_defense(name, suspect, CleanSet(x, y), settings)
        after = evaluate_model(res.model, xt, yt, attack.trigger_floats, attack.target_of)
        out[name] = {"acc": after["acc"], "asr": after["asr"], "ra": after["ra"], "seconds": res.seconds,
                     "der": defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])}
        if progress:
            print(f"{attack_name:>12} baseline {name:>8}: ACC {100 * after['acc']:5.2f} ASR {100 * after['asr']:6.2f} "
                  f"DER {out[name]['der']:.3f}", flush=True)
    return out


def sweep_seconds(sweep: dict) -> float:
    """What the defender's sweep cost: every trial's purification, holdout measurement and probe, and the holdout's
    reference features (the test-set reporting is left out)."""
    return sum(t["seconds"] + t.get("uap_seconds", 0.0) for t in sweep["trials"]) + sweep["holdout_seconds"]


def choose(sweep: dict, weights: ObjectiveWeights) -> dict:
    """The trial the defender picks: the argmax of the objective (features only; DER is never read)."""
    scored = [(score(t, sweep["suspect_holdout"], weights), t["trial"]) for t in sweep["trials"]]
    best = max(scored)[1]
    return next(t for t in sweep["trials"] if t["trial"] == best)


def _spearman_where_measured(trials: list[dict], feature: str) -> float:
    """Rank correlation of `feature` with DER over the trials that measured it (older sweeps lack the
    diagnostics)."""
    have = [t for t in trials if feature in t]
    return spearman([t[feature] for t in have], [t["der"] for t in have]) if len(have) > 1 else float("nan")


def summarise(sweeps: list[dict], weights: ObjectiveWeights, dataset: str, results: Path, space: dict | None = None,
              stem: str | None = None) -> dict:
    per_attack, pooled_der = [], []
    unprobed = sorted({s["attack"] for s in sweeps for t in s["trials"] if "uap_max" not in t})
    if weights.uap and unprobed:
        raise ValueError(f"the objective weighs uap_max but the saved trials of {', '.join(unprobed)} did not "
                         "measure it (sweeps from before the probe); re-run them")
    for s in sweeps:
        for t in s["trials"]:
            t["objective"] = score(t, s["suspect_holdout"], weights)
            t["objective_a_priori"] = score(t, s["suspect_holdout"], A_PRIORI_WEIGHTS)
            if "uap_max" in t:
                for name, w in CANDIDATE_WEIGHTS.items():
                    t[f"objective_{name}"] = score(t, s["suspect_holdout"], w)
        ders = [t["der"] for t in s["trials"]]
        corr = {f: _spearman_where_measured(s["trials"], f) for f in (*COLUMNS, *UAP_FEATURES)}
        probed = all("uap_max" in t for t in s["trials"])
        by_candidate = {name: choose(s, w) for name, w in CANDIDATE_WEIGHTS.items()} if probed else {}
        chosen = choose(s, weights)
        best = max(s["trials"], key=lambda t: t["der"])
        seconds = sweep_seconds(s)
        per_attack.append({"attack": s["attack"], "spearman": corr, "chosen": chosen, "oracle": best,
                           "chosen_by_candidate": by_candidate,
                           "sweep_seconds": seconds, "before": s["before"]})
        pooled_der += ders
    pooled = {}
    for f in (*COLUMNS, *UAP_FEATURES):
        pooled[f] = _spearman_where_measured([t for s in sweeps for t in s["trials"]], f)
    means = {}
    if per_attack:
        means = {k: statistics.mean(p["chosen"][k] for p in per_attack) for k in ("acc", "asr", "ra", "der")}
        means["acc_drop"] = statistics.mean(p["before"]["acc"] - p["chosen"]["acc"] for p in per_attack)
        means["oracle_der"] = statistics.mean(p["oracle"]["der"] for p in per_attack)
        means["spearman_mean"] = statistics.mean(p["spearman"]["objective"] for p in per_attack)
    corr_cols = (*COLUMNS, *UAP_FEATURES)
    corr_rows = [[p["attack"], *(round(p["spearman"].get(f, float("nan")), 2) for f in corr_cols)] for p in per_attack]
    corr_rows.append(["pooled", *(round(pooled[f], 2) for f in corr_cols)])
    chosen_rows = [[p["attack"], p["chosen"]["trial"], p["chosen"]["params"]["method"],
                    100 * p["chosen"]["acc"], 100 * p["chosen"]["asr"], 100 * p["chosen"]["ra"],
                    round(p["chosen"]["der"], 3), round(p["oracle"]["der"], 3), round(p["sweep_seconds"], 1)]
                   for p in per_attack]
    trial_rows = [[s["attack"], t["trial"], t["params"]["method"], t["params"]["iterations"],
                   f"{t['params']['eta_f']:.1e}", f"{t['params']['eta_r']:.2f}", f"{t['params']['eta_kl']:.2f}",
                   f"{t['params']['lr']:.4f}", f"{t['params']['crop_until']:.2f}", round(t["objective"], 4),
                   round(t["objective_a_priori"], 4),
                   100 * t["holdout_acc"], round(t["kl_to_suspect"], 3), round(t["trace_ratio"], 3),
                   *(round(t[f], 3) if f in t else "-" for f in UAP_FEATURES),
                   100 * t["acc"], 100 * t["asr"], round(t["der"], 3)] for s in sweeps for t in s["trials"]]
    md = (f"# FIP tuned by the defender's objective on {dataset}\n\n"
          "Trials run in-process (`fip.purify.purify`) on the `dval-train` share of D_val; the objective "
          "(tuning/objective.py, weights below) reads only the `dval-holdout` share; ACC/ASR/RA/DER on the test "
          "set are for this report. The chosen trial is the argmax of the objective.\n\n"
          f"Weights: {json.dumps(weights.__dict__)}; a priori (before any validation): "
          f"{json.dumps(A_PRIORI_WEIGHTS.__dict__)}\n\nSearch space: {json.dumps(space)}\n\n"
          "## Spearman rank correlation with DER over the trials\n\n"
          + markdown_table(["attack", *corr_cols], corr_rows)
          + "\n`uap_max`, `uap_gap` (tuning.objective.universal_flip) and the candidate objectives that score "
            "them (tuning.objective.CANDIDATE_WEIGHTS, each fixed before the sweeps that validate it) exist only for "
            "the sweeps run since they were added.\n"
          + "\n## The chosen trial per attack (fip-tuned)\n\n"
          + markdown_table(["attack", "trial", "method", "ACC %", "ASR %", "RA %", "DER", "best DER in sweep",
                            "sweep seconds"], chosen_rows)
          + (f"\nMean: ACC {100 * means['acc']:.2f} %, ACC drop {100 * means['acc_drop']:.2f} points, "
             f"ASR {100 * means['asr']:.2f} %, DER {means['der']:.3f} (the best trial per attack would give "
             f"{means['oracle_der']:.3f}); mean per-attack Spearman {means['spearman_mean']:.2f}.\n" if means else "")
          + "\n## Every trial\n\n"
          + markdown_table(["attack", "trial", "method", "iters", "eta_f", "eta_r", "eta_kl", "lr", "crop_until",
                            "objective", "a-priori objective", "holdout ACC %", "KL", "Tr F ratio", *UAP_FEATURES, "ACC %", "ASR %",
                            "DER"], trial_rows))
    for name in CANDIDATE_WEIGHTS:
        md += _candidate_section(name, sweeps, per_attack)
    md += _refit_section(sweeps, per_attack)
    same = compare_on_same_attacks(sweeps, per_attack)
    if same:
        md += ("\n## Against the table's defenses on the same suspects\n\n"
               f"Means over {', '.join(p['attack'] for p in per_attack)} only; every defense run here on the "
               "same cached suspects and full D_val (benchmarks.defense_table's settings):\n\n"
               + markdown_table(["defense", "ACC %", "ACC drop", "ASR %", "DER"],
                                [[d, 100 * m["acc"], 100 * m["acc_drop"], 100 * m["asr"], round(m["der"], 3)]
                                 for d, m in same.items()]))
    payload = {"dataset": dataset, "weights": weights.__dict__, "same_attacks": same, "space": space, "sweeps": sweeps, "per_attack": per_attack,
               "pooled_spearman": pooled, "means": means, "versions": versions()}
    write_results(stem or f"tuned-{dataset}", payload, md, results)
    return payload


def _outcome(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    """Mean ACC, ASR, DER and ACC drop over (attack summary, measured model) pairs."""
    out = {k: statistics.mean(r[k] for _, r in pairs) for k in ("acc", "asr", "der")}
    out["drop"] = statistics.mean(p["before"]["acc"] - r["acc"] for p, r in pairs)
    return out


def _candidate_section(name: str, sweeps: list[dict], per_attack: list[dict]) -> str:
    """A candidate objective's picks beside the chosen objective's, on the attacks whose trials measured the
    probe, with their refits where they ran."""
    rows, picks, refits = [], [], []
    for s, p in zip(sweeps, per_attack):
        c = p.get("chosen_by_candidate", {}).get(name)
        if c is None:
            continue
        picks.append((p, c))
        r = s.get("refit", {}).get(str(c["trial"]))
        if r is not None:
            refits.append((p, r))
        rows.append([p["attack"], p["chosen"]["trial"], round(p["chosen"]["der"], 3), c["trial"], 100 * c["acc"],
                     100 * c["asr"], round(c["der"], 3), round(r["der"], 3) if r else "-", round(p["oracle"]["der"], 3)])
    if not picks:
        return ""
    mean = _outcome(picks)
    base = statistics.mean(p["chosen"]["der"] for p, _ in picks)
    out = (f"\n## Candidate objective `{name}` (validation)\n\n"
           f"Weights: {json.dumps(CANDIDATE_WEIGHTS[name].__dict__)}\n\n"
           + markdown_table(["attack", "objective's trial", "its DER", "candidate's trial", "ACC %", "ASR %", "DER",
                             "DER refit", "best DER in sweep"], rows)
           + f"\nMean over these {len(picks)} attacks: candidate DER {mean['der']:.3f} (ACC drop {100 * mean['drop']:.2f} "
             f"points, ASR {100 * mean['asr']:.2f} %) against the objective's {base:.3f}.\n")
    if len(refits) == len(picks):
        rmean = _outcome(refits)
        out += (f"Refit on all of D_val: DER {rmean['der']:.3f}, ACC drop {100 * rmean['drop']:.2f} points, "
                f"ASR {100 * rmean['asr']:.2f} %.\n")
    return out


def _refit_section(sweeps: list[dict], per_attack: list[dict]) -> str:
    """The chosen settings re-run on all of D_val, beside the chosen trial itself."""
    rows, got = [], []
    for s, p in zip(sweeps, per_attack):
        r = s.get("refit", {}).get(str(p["chosen"]["trial"]))
        if r is None:
            continue
        got.append((p, r))
        rows.append([p["attack"], p["chosen"]["trial"], 100 * p["chosen"]["acc"], 100 * p["chosen"]["asr"],
                     round(p["chosen"]["der"], 3), 100 * r["acc"], 100 * r["asr"], round(r["der"], 3)])
    if not got:
        return ""
    mean = _outcome(got)
    return ("\n## The chosen settings refit on all of D_val\n\n"
            + markdown_table(["attack", "trial", "ACC % (70 % of D_val)", "ASR %", "DER", "ACC % (refit, all D_val)",
                              "ASR %", "DER"], rows)
            + f"\nRefit mean over {len(got)} attacks: ACC drop {100 * mean['drop']:.2f} points, ASR {100 * mean['asr']:.2f} %, "
              f"DER {mean['der']:.3f}.\n")


def compare_on_same_attacks(sweeps: list[dict], per_attack: list[dict]) -> dict:
    """Means over the swept attacks of each baseline run on the same suspects, with fip-tuned beside them."""
    rows = []
    for s, p in zip(sweeps, per_attack):
        for name, m in s.get("baselines", {}).items():
            rows.append({"defense": name, **m, "acc_before": s["before"]["acc"]})
        rows.append({"defense": "fip-tuned (chosen trial, 70 % of D_val)", "acc": p["chosen"]["acc"],
                     "asr": p["chosen"]["asr"], "der": p["chosen"]["der"], "acc_before": s["before"]["acc"]})
        refit = s.get("refit", {}).get(str(p["chosen"]["trial"]))
        if refit is not None:  # what `fip tune --refit` registers
            rows.append({"defense": "fip-tuned (refit on all of D_val)", **refit, "acc_before": s["before"]["acc"]})
    out = {}
    for d in dict.fromkeys(r["defense"] for r in rows):
        rs = [r for r in rows if r["defense"] == d]
        if len(rs) != len(per_attack):
            continue  # a baseline missing on some attack would not be compared like for like
        out[d] = {k: statistics.mean(r[k] for r in rs) for k in ("acc", "asr", "der")}
        out[d]["acc_drop"] = statistics.mean(r["acc_before"] - r["acc"] for r in rs)
    return out


def add_to_defense_table(summary: dict, dataset: str, results: Path) -> None:
    """Put the chosen trials into the defense table as the ``fip-tuned`` row (other rows untouched)."""
    from benchmarks.defense_table import summarise as defense_summary

    path = results / f"defenses-{dataset}.json"
    if not path.is_file():
        return
    table = json.loads(path.read_text())
    rows = [r for r in table["rows"] if r["defense"] != "fip-tuned"]
    for p in summary["per_attack"]:
        c = p["chosen"]  # the trial's own model: what `fip tune` registers by default
        rows.append({"attack": p["attack"], "defense": "fip-tuned", "acc_before": p["before"]["acc"],
                     "asr_before": p["before"]["asr"], "acc": c["acc"], "asr": c["asr"], "ra": c["ra"],
                     "der": c["der"], "seconds": p["sweep_seconds"],
                     "info": {"trial": c["trial"], "params": c["params"], "objective": c["objective"]}})
    defenses = list(dict.fromkeys([r["defense"] for r in rows]))
    defense_summary(rows, defenses, False, dataset, results,
                    note=f"The fip-tuned row comes from benchmarks/tuned_table.py, a separate run: per attack the trial the "
                         f"defender's objective picks (what `fip tune` registers), its seconds the whole sweep's on one "
                         f"thread. It covers "
                         f"{', '.join(p['attack'] for p in summary['per_attack'])} only, and its suspects are the "
                         "cached models of that run, retrained since this table was measured (same settings, "
                         "different weights: e.g. BadNets ACC 91.96 % against 91.66 %); so its mean row is not "
                         "comparable with the others'. tuned-fashion-mnist.md compares it with every defense but ANP "
                         "re-run on the same suspects.")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--holdout-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--space", default=None, help="search space YAML (default: tuning.space.DEFAULT_SPACE_IMAGES)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=KIND:A:B",
                   help="change one setting of the space, as `fip tune --space` does (e.g. iterations=150)")
    p.add_argument("--resummarise", action="store_true", help="recompute the tables from the saved trials only")
    p.add_argument("--baselines-only", action="store_true", help="only run the missing baselines of the saved sweeps")
    p.add_argument("--append", action="store_true", help="keep the saved sweeps of other attacks (replace these)")
    p.add_argument("--no-defense-table", action="store_true")
    p.add_argument("--baselines", default="ft,ft-sam,fip", help="defenses re-run on the same suspects for comparison")
    p.add_argument("--refit", action="store_true",
                   help="with --resummarise: re-run the chosen trials' settings on all of D_val (saved sweeps of --attacks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 on a shared, loaded machine)")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also score each trial's model every STEPS steps (what a scheduler such as ASHA reads)")
    p.add_argument("--results", default=None, metavar="STEM",
                   help="name of the saved results in benchmarks/results (default tuned-<dataset>)")
    p.add_argument("--merge", action="append", default=[], metavar="STEM",
                   help="add the sweeps saved under STEM (another process's share of the attacks) before summarising")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    space = SearchSpace.from_yaml(args.space) if args.space else SearchSpace.default()
    if args.set:
        space = space.with_flags(args.set)
    weights = ObjectiveWeights()
    stem = args.results or f"tuned-{args.dataset}"
    saved = RESULTS / f"{stem}.json"
    sweeps = []
    if args.resummarise or args.append or args.baselines_only:
        sweeps = json.loads(saved.read_text())["sweeps"] if saved.is_file() else []
    for other in args.merge:
        theirs = json.loads((RESULTS / f"{other}.json").read_text())["sweeps"]
        sweeps = [s for s in sweeps if s["attack"] not in {t["attack"] for t in theirs}] + theirs

    def save(done: list[dict]) -> dict:
        return summarise(done, weights, args.dataset, RESULTS, space.describe(), stem)
    if not (args.resummarise or args.baselines_only):
        for name in args.attacks.split(","):
            sweeps = [s for s in sweeps if s["attack"] != name]

            def partial(sweep: dict, done: list[dict] = sweeps) -> None:
                save([*done, sweep])

            sweeps.append(sweep_attack(name, args.trials, args.dataset, args.holdout_fraction, args.seed, space, CACHE,
                                       weights, on_trial=partial, checkpoint_every=args.checkpoint_every))
            summary = save(sweeps)  # partial results after each attack
    if args.baselines and not args.resummarise:
        wanted = args.baselines.split(",")
        for s in sweeps:
            if set(wanted) - set(s.get("baselines", {})) and s["attack"] in args.attacks.split(","):
                s["baselines"] = {**s.get("baselines", {}),
                                  **run_baselines(s["attack"], [n for n in wanted if n not in s.get("baselines", {})],
                                                  args.dataset, CACHE)}
                save(sweeps)
    if args.refit:
        for s in sweeps:
            if s["attack"] not in args.attacks.split(","):
                continue
            picks = [choose(s, weights)]
            if all("uap_max" in t for t in s["trials"]):
                picks += [choose(s, w) for w in CANDIDATE_WEIGHTS.values()]
            todo = [t for t in picks if str(t["trial"]) not in s.get("refit", {})]
            if todo:
                s["refit"] = {**s.get("refit", {}), **refit_chosen(s, todo, args.dataset, CACHE, args.seed)}
                save(sweeps)
    summary = save(sweeps)
    if not args.no_defense_table:
        add_to_defense_table(summary, args.dataset, RESULTS)
    print(json.dumps({"pooled_spearman": summary["pooled_spearman"], "means": summary["means"]}, indent=1))
    return summary


if __name__ == "__main__":
    main()
