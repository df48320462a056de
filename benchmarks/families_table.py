"""FT, FT-SAM and FIP tuned by the defender's objective on suspects of the three accepted model families.

    python -m benchmarks.families_table                         # 3 families x badnets, blend
    python -m benchmarks.families_table --trials 4              # fewer FIP trials per sweep
    python -m benchmarks.families_table --families hf --attacks badnets --resume   # add what is missing
    python -m benchmarks.families_table --quick                 # tiny budgets: the script's own check

The lab backdoors Fashion-MNIST models of each family (:data:`RECIPES`: a torchvision ResNet-18, a small timm
ViT, an HF ViT built from a local config folder), each taking the 1x28x28 images through its input adapter
and its family's normalisation. On each suspect and the lab's 1 % D_val: FT and FT-SAM as
benchmarks/defense_table.py runs them, and FIP swept and chosen as benchmarks/tuned_table.py does (the
default search space, objective on the held-out share of D_val, winner chosen without the trigger); the
trials' settings are the same on every family. ACC/ASR/RA on the test set are for the report only.

Writes ``benchmarks/results/families-defenses[-quick].{json,md}``, beside our own architecture's numbers on
the same attacks (tuned-<dataset>.json), and a per-suspect diagnosis of the sweep.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.common import CACHE, RESULTS, markdown_table, write_results
from benchmarks.tuned_table import choose, run_baselines, sweep_attack, sweep_seconds
from fip.families import import_transformers
from lab.attacks import AttackConfig
from lab.backdoor import LabConfig, make_backdoored_model, versions
from lab.train import TrainConfig
from tuning.objective import ObjectiveWeights
from tuning.report import spearman
from tuning.space import SearchSpace

ATTACKS = ("badnets", "blend")
BASELINES = ("ft", "ft-sam")
# the HF suspect's config (its folder is named after it: the lab's cache key holds the folder's path, not its config)
HF_VIT = {"image_size": 28, "patch_size": 7, "num_channels": 1, "hidden_size": 96, "num_hidden_layers": 4,
          "num_attention_heads": 4, "intermediate_size": 192, "num_labels": 10}
HF_NORMALIZATION = {"image_mean": [0.286], "image_std": [0.353]}  # Fashion-MNIST's own mean and std


@dataclass(frozen=True)
class Recipe:
    """How the lab makes one family's suspect: the architecture, its input size and builder options, and the
    training budget (chosen to reach a useful clean ACC and a high ASR on 2 cores)."""

    arch: str  # "hf" stands for the local config folder (:func:`hf_folder`)
    image_size: int
    epochs: int
    train_limit: int | None
    arch_options: dict = field(default_factory=dict)
    lr: float = 0.1


RECIPES: dict[str, Recipe] = {
    "torchvision": Recipe("torchvision:resnet18", 28, epochs=3, train_limit=15000),
    # vit_tiny's width (192) and 3 heads, 4 blocks, 7 x 7 patches (16 tokens): 4 x 4 patches (49 tokens) cost
    # 3 x the time per FIP trial (its universal-flip probe alone 76 s against 20 s)
    "timm": Recipe("timm:vit_tiny_patch16_224", 28, epochs=6, train_limit=20000,
                   arch_options={"patch_size": 7, "depth": 4}),
    # 7 x 7 patches as timm's: with 4 x 4 (49 tokens) 3 epochs reached 56 % ACC and 18 % ASR, no suspect to purify
    "hf": Recipe("hf", 28, epochs=6, train_limit=20000),
}
TEST_LIMIT = 2000  # test images every ACC/ASR/RA is measured on: each trial is measured once more

# --quick: the whole path on tiny budgets (seconds per suspect), for the script's own test
QUICK = {"epochs": 1, "train_limit": 600, "test_limit": 200, "trials": 1, "iterations": 4, "steps": 4}


def hf_folder(cache: Path) -> Path:
    """A small HF ViT image classifier as a user would bring it: ``save_pretrained`` of a local ViTConfig
    (:data:`HF_VIT`) and a ViTImageProcessor with Fashion-MNIST's mean/std.
    The lab builds its model from the config alone; the saved weights are not used."""
    c = HF_VIT
    folder = cache / "families" / (f"hf-vit-{c['image_size']}px-p{c['patch_size']}-d{c['hidden_size']}"
                                   f"-l{c['num_hidden_layers']}-h{c['num_attention_heads']}")
    if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
        return folder
    tr = import_transformers()
    torch.manual_seed(0)
    tr.ViTForImageClassification(tr.ViTConfig(**HF_VIT)).save_pretrained(folder)
    tr.ViTImageProcessor(**HF_NORMALIZATION).save_pretrained(folder)
    return folder


def lab_config(family: str, attack: str, dataset: str, cache: Path, quick: bool = False) -> LabConfig:
    """The LabConfig of one family's suspect under `attack` (the attack's own defaults otherwise)."""
    r = RECIPES[family]
    arch = f"hf:{hf_folder(cache)}" if r.arch == "hf" else r.arch
    epochs, limit, test_limit = (QUICK["epochs"], QUICK["train_limit"], QUICK["test_limit"]) if quick else \
        (r.epochs, r.train_limit, TEST_LIMIT)
    return LabConfig(attack=AttackConfig(attack), dataset=dataset, arch=arch, image_size=r.image_size,
                     arch_options=dict(r.arch_options), train=TrainConfig(epochs=epochs, lr=r.lr),
                     train_limit=limit, test_limit=test_limit)


def parameter_count(cfg: LabConfig, cache: Path) -> int:
    from lab.backdoor import load_lab_model

    art = make_backdoored_model(cfg, cache / "lab", progress=False)
    return sum(p.numel() for p in load_lab_model(art.model_path).parameters())


def run_suspect(family: str, attack: str, trials: int, dataset: str, space: SearchSpace, weights: ObjectiveWeights,
                cache: Path, holdout_fraction: float, seed: int, quick: bool, partial: dict | None = None,
                keep: Callable[[dict], None] | None = None) -> dict:
    """Make (or reuse) one suspect, run the baselines and the FIP sweep on it; the chosen trial is FIP-tuned.
    `partial`: what a stopped run of this suspect finished (its baselines and trials, reused when the suspect
    measures the same); `keep` receives the work so far after the baselines and after every trial."""
    cfg = lab_config(family, attack, dataset, cache, quick)
    t = time.perf_counter()
    art = make_backdoored_model(cfg, cache / "lab")
    settings = {"steps": QUICK["steps"]} if quick else None
    partial = partial if partial and partial.get("model") == art.model_path.name else {}  # another suspect's: none
    baselines = partial.get("baselines")
    if baselines is None:
        baselines = run_baselines(attack, list(BASELINES), dataset, cache, cfg=cfg, settings=settings)
    progress = {"model": art.model_path.name, "baselines": baselines}
    if keep is not None:
        keep(progress)

    def kept(sweep: dict) -> None:
        if keep is not None:
            keep({**progress, "sweep": sweep})
    sweep = sweep_attack(attack, trials, dataset, holdout_fraction, seed, space, cache, weights, cfg=cfg,
                         on_trial=kept, done=partial.get("sweep"))
    chosen = choose(sweep, weights)
    return {"family": family, "attack": attack, "arch": cfg.arch, "recipe": asdict(RECIPES[family]),
            "lab_config": cfg.to_dict(), "model": art.model_path.name, "params": parameter_count(cfg, cache),
            "train_seconds": art.record["train_seconds"], "reused": art.reused,
            "before": sweep["before"], "baselines": baselines, "sweep": sweep,
            "chosen": {k: chosen[k] for k in ("trial", "params", "acc", "asr", "ra", "der", "objective",
                                              "holdout_acc", "kl_to_suspect", "trace_ratio")},
            "oracle_der": max(x["der"] for x in sweep["trials"]), "sweep_seconds": sweep_seconds(sweep),
            "trials": len(sweep["trials"]), "wall_seconds": time.perf_counter() - t}


def rows_of(suspect: dict) -> list[dict]:
    """One row per defense on a suspect: ACC/ASR/RA before and after, DER, seconds, trials."""
    b = suspect["before"]
    base = {"family": suspect["family"], "attack": suspect["attack"], "acc_before": b["acc"],
            "asr_before": b["asr"], "ra_before": b["ra"]}
    rows = [{**base, "defense": name, **{k: m[k] for k in ("acc", "asr", "ra", "der", "seconds")}, "trials": 1}
            for name, m in suspect["baselines"].items()]
    c = suspect["chosen"]
    rows.append({**base, "defense": "fip-tuned", "acc": c["acc"], "asr": c["asr"], "ra": c["ra"], "der": c["der"],
                 "seconds": suspect["sweep_seconds"], "trials": suspect["trials"]})
    return rows


def ours(dataset: str, attacks: list[str], trials: int, weights: ObjectiveWeights, results: Path) -> list[dict]:
    """Our architecture's suspects on the same attacks, from tuned_table's saved run (its FT/FT-SAM were run on
    the same suspects as its sweep): as saved, and, when the families ran fewer trials, chosen again among its
    first `trials` trials: a choice among as many draws of the same space (its draws are not the families'
    settings: that sweep was drawn before the space's current form)."""
    path = results / f"tuned-{dataset}.json"
    if not path.is_file():
        return []
    out = []
    for s in json.loads(path.read_text())["sweeps"]:
        if s["attack"] not in attacks:
            continue
        cuts = {"ours": s["trials"]}
        if trials < len(s["trials"]):
            cuts[f"ours ({trials} trials)"] = s["trials"][:trials]
        for label, kept in cuts.items():
            sweep = {**s, "trials": kept}
            out.append({"family": label, "attack": s["attack"], "before": s["before"], "sweep": sweep,
                        "sweep_seconds": sweep_seconds(sweep), "trials": len(kept), "chosen": choose(sweep, weights),
                        "baselines": {n: m for n, m in s.get("baselines", {}).items() if n in BASELINES}})
    return out


def means(rows: list[dict]) -> list[dict]:
    """Mean row per family and defense."""
    out = []
    for fam in dict.fromkeys(r["family"] for r in rows):
        for d in dict.fromkeys(r["defense"] for r in rows):
            rs = [r for r in rows if r["family"] == fam and r["defense"] == d]
            if rs:
                m = {k: statistics.mean(r[k] for r in rs) for k in ("acc", "asr", "ra", "der", "seconds")}
                m["acc_drop"] = statistics.mean(r["acc_before"] - r["acc"] for r in rs)
                m["asr_removed"] = statistics.mean(r["asr_before"] - r["asr"] for r in rs)
                out.append({"family": fam, "defense": d, "n": len(rs), **m})
    return out


def diagnosis(suspects: list[dict]) -> list[dict]:
    """Per suspect, what decides FIP-tuned's DER: the chosen trial against the sweep's best and mean trial (the
    method's reach on this model vs the choice), the objective's rank correlation with DER over the trials, and
    the chosen trial's holdout features."""
    out = []
    for s in suspects:
        trials = s["sweep"]["trials"]
        ders = [t["der"] for t in trials]
        corr = spearman([t["objective"] for t in trials], ders) if len(trials) > 1 else float("nan")
        c = s["chosen"]
        out.append({"family": s["family"], "attack": s["attack"], "chosen_der": c["der"], "oracle_der": max(ders),
                    "mean_trial_der": statistics.mean(ders), "spearman_objective": corr,
                    "mean_trial_acc": statistics.mean(t["acc"] for t in trials),
                    "mean_trial_asr": statistics.mean(t["asr"] for t in trials),
                    "chosen_holdout_acc": c["holdout_acc"], "chosen_kl": c["kl_to_suspect"],
                    "chosen_trace_ratio": c["trace_ratio"], "suspect_trace": s["sweep"]["suspect_holdout"]["trace"],
                    "seconds_per_trial": s["sweep_seconds"] / len(trials)})
    return out


def summarise(suspects: list[dict], dataset: str, quick: bool, settings: dict, weights: ObjectiveWeights,
              results: Path, notes: str = "", unfinished: dict | None = None) -> dict:
    unfinished = unfinished or {}
    attacks = sorted({s["attack"] for s in suspects})
    reference = [] if quick else ours(dataset, attacks, settings["trials"], weights, results)
    rows = [r for s in suspects for r in rows_of(s)]
    ref_rows = [r for s in reference for r in rows_of(s)]
    mean_rows = means(rows + ref_rows)
    diag = diagnosis(suspects + reference)
    pct = lambda v: 100 * v  # noqa: E731
    suspect_table = [[s["family"], s["attack"], s["arch"].split("/")[-1], s["params"], s["lab_config"]["train"]["epochs"],
                      s["lab_config"]["train_limit"], round(s["train_seconds"], 1), pct(s["before"]["acc"]),
                      pct(s["before"]["asr"]), pct(s["before"]["ra"])] for s in suspects]
    row_table = [[r["family"], r["attack"], r["defense"], pct(r["acc_before"]), pct(r["asr_before"]),
                  pct(r["ra_before"]), pct(r["acc"]), pct(r["asr"]), pct(r["ra"]), round(r["der"], 3),
                  round(r["seconds"], 1), r["trials"]] for r in rows + ref_rows]
    mean_table = [[m["family"], m["defense"], m["n"], pct(m["acc"]), pct(m["acc_drop"]), pct(m["asr"]),
                   pct(m["asr_removed"]), pct(m["ra"]), round(m["der"], 3), round(m["seconds"], 1)] for m in mean_rows]
    diag_table = [[d["family"], d["attack"], round(d["chosen_der"], 3), round(d["oracle_der"], 3),
                   round(d["mean_trial_der"], 3), round(d["spearman_objective"], 2), pct(d["mean_trial_acc"]),
                   pct(d["mean_trial_asr"]), pct(d["chosen_holdout_acc"]), round(d["chosen_kl"], 3),
                   round(d["chosen_trace_ratio"], 3), f"{d['suspect_trace']:.3g}", round(d["seconds_per_trial"], 1)]
                  for d in diag]
    md = (f"# Defenses on three model families, {dataset}{' (quick mode)' if quick else ''}\n\n"
          "Suspects made by the lab (benchmarks/families_table.py, `RECIPES`); on each, with the lab's 1 % D_val: "
          "FT and FT-SAM as benchmarks/defense_table.py runs them, and FIP tuned as benchmarks/tuned_table.py "
          "tunes it (in-process sweep over the default search space, objective on the held-out 30 % of D_val, "
          "winner chosen without the trigger; `seconds` of fip-tuned is the whole sweep's). The trials' settings "
          "are drawn from the same seed on every family, so trial *i* is the same FIP configuration everywhere. "
          f"{torch.get_num_threads()} CPU threads.\n\n"
          f"Settings: {json.dumps(settings)}\n\n"
          + (f"## Findings\n\n{notes.strip()}\n\n" if notes.strip() else "")
          + ("Unfinished (`--resume` goes on from here): " + ", ".join(
              f"{k} ({len(w.get('sweep', {}).get('trials', []))} of {settings['trials']} trials)"
              for k, w in unfinished.items()) + ".\n\n" if unfinished else "")
          + "## Suspects\n\n"
          + markdown_table(["family", "attack", "arch", "parameters", "epochs", "train images", "train seconds",
                            "ACC %", "ASR %", "RA %"], suspect_table)
          + "\n## Mean per family and defense\n\n"
          + markdown_table(["family", "defense", "suspects", "ACC %", "ACC drop", "ASR %", "ASR removed", "RA %",
                            "DER", "seconds"], mean_table)
          + ("\n`ours` is our preactresnet18 (width 0.125), from tuned-"
             f"{dataset}.json (FT/FT-SAM re-run on the same suspects as its sweep; the full test set), "
             f"`ours ({settings['trials']} trials)` the same sweep chosen among its first {settings['trials']} "
             "trials (as many draws from the same space as the families had); the families are measured on the first "
             f"{settings.get('test_limit')} test images.\n" if reference else "")
          + "\n## Per suspect and defense\n\n"
          + markdown_table(["family", "attack", "defense", "ACC before", "ASR before", "RA before", "ACC %", "ASR %",
                            "RA %", "DER", "seconds", "trials"], row_table)
          + "\n## The FIP sweep per suspect\n\n"
          "Chosen DER against the best and the mean trial of the same sweep (is it the method's reach on this "
          "model, or the choice?), the objective's Spearman correlation with DER over the trials, the trials' mean "
          "test ACC/ASR, the chosen trial's holdout ACC, KL to the suspect and Tr(F) ratio, and the suspect's "
          "Tr(F) on the holdout (the scale FIP's eta_f and eta_r act on).\n\n"
          + markdown_table(["family", "attack", "chosen DER", "best DER", "mean DER", "Spearman obj", "mean ACC %",
                            "mean ASR %", "chosen holdout ACC %", "chosen KL", "chosen Tr F ratio", "suspect Tr F",
                            "seconds / trial"], diag_table))
    payload = {"dataset": dataset, "quick": quick, "settings": settings, "notes": notes, "suspects": suspects,
               "unfinished": unfinished, "rows": rows, "reference_rows": ref_rows, "means": mean_rows, "diagnosis": diag,
               "threads": torch.get_num_threads(), "versions": versions()}
    write_results(f"families-defenses{'-quick' if quick else ''}", payload, md, results)
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(RECIPES))
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--holdout-fraction", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budgets everywhere: checks the path, measures nothing")
    p.add_argument("--resume", action="store_true", help="keep the saved suspects, run only the missing ones")
    p.add_argument("--resummarise", action="store_true", help="rewrite the tables from the saved results only")
    p.add_argument("--notes", default=None, metavar="FILE", help="markdown put under Findings (kept on resummarise)")
    p.add_argument("--cache", default=str(CACHE))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache, results = Path(args.cache), Path(args.results)
    space = SearchSpace.default()
    trials = QUICK["trials"] if args.quick else args.trials
    if args.quick:
        space = space.with_flags([f"iterations={QUICK['iterations']}"])
    weights = ObjectiveWeights()
    saved_path = results / f"families-defenses{'-quick' if args.quick else ''}.json"
    saved = json.loads(saved_path.read_text()) if (args.resume or args.resummarise) and saved_path.is_file() else {}
    suspects = saved.get("suspects", [])
    notes = Path(args.notes).read_text() if args.notes else saved.get("notes", "")
    settings = saved.get("settings") or {
        "recipes": {k: asdict(v) for k, v in RECIPES.items()}, "test_limit": TEST_LIMIT, "trials": trials,
        "space": space.describe(), "baselines": list(BASELINES), **({"quick": QUICK} if args.quick else {})}
    unfinished = saved.get("unfinished", {})  # "family/attack": a stopped run's baselines and trials
    if not args.resummarise:
        for attack in args.attacks.split(","):  # attack-major: a run cut short still has every family once
            for family in args.families.split(","):
                if any(s["family"] == family and s["attack"] == attack for s in suspects):
                    continue
                key = f"{family}/{attack}"

                def keep(work: dict, key: str = key) -> None:  # a stopped run resumes from here (--resume)
                    unfinished[key] = work
                    summarise(suspects, args.dataset, args.quick, settings, weights, results, notes, unfinished)
                suspects.append(run_suspect(family, attack, trials, args.dataset, space, weights, cache,
                                            args.holdout_fraction, args.seed, args.quick, unfinished.get(key), keep))
                unfinished.pop(key, None)
                summarise(suspects, args.dataset, args.quick, settings, weights, results, notes, unfinished)
    out = summarise(suspects, args.dataset, args.quick, settings, weights, results, notes, unfinished)
    print(json.dumps([{k: m[k] if isinstance(m[k], str | int) else round(m[k], 4) for k in m} for m in out["means"]],
                     indent=1))
    return out


if __name__ == "__main__":
    main()
