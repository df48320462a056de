"""FIP and fine-tuning tuned per suspect by the trigger-free text objective, on the language lab's GPT-2s.

    python -m benchmarks.language_tuned                           # 3 attacks x 2 defences, suspects in /tmp/lmlab
    python -m benchmarks.language_tuned --attacks word-vz --resume  # + the variant no setting was chosen on
    python -m benchmarks.language_tuned --defences ft-tuned --resume

What ``fip tune`` does for a language model, with a grid for a searcher and in-process (no Ray), so that every
candidate is also measured for the report: per suspect, the defender's clean set (D_val's pairs and plain text,
benchmarks.language_table.clean_set) is split as a sweep splits it (tuning.holdout.split_sequences, 30 % held
out, seeded); each CANDIDATES setting purifies the suspect on the train share; the sweep's default objective
scores it on the held-out share (next-token accuracy lost, pairs and text, and `uap_max` of the insertion probe:
tuning.objective, tuning.text_probe); per defence (FIP's grid, fine-tuning's grid) the highest objective is the
suspect's "fip-tuned" or "ft-tuned" model. The attack record (ASR, perplexity, DER) is read for reporting only,
after the choice. Beside it, the report shows what the objective chose when its accuracy counted every held-out
token (before per-sequence accuracy: text blocks held most tokens and hid the instruction pairs), from the same
candidates, and each candidate's held-out accuracy on the pairs and on the text apart.
Writes ``benchmarks/results/language-tuned.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.language_table import ATTACKS, SUSPECTS, VARIANTS, Job, against_record, clean_set, suspect_of
from lab.backdoor import versions

HOLDOUT_FRACTION, SEED, ITERATIONS, BATCH, MOMENTUM, THREADS = 0.3, 0, 200, 32, 0.9, 1


@dataclass(frozen=True)
class Candidate:
    """One trial's settings: the lr, the Fisher-weighted pull eta_r, our eta_kl (KL to the suspect on clean
    batches) and eta_F (None: PurifyConfig's default). Fine-tuning is FIP's loop with every regulariser at 0."""

    lr: float
    eta_r: float
    eta_kl: float = 0.0
    eta_f: float | None = None

    @property
    def defence(self) -> str:
        return "ft-tuned" if self.eta_f == 0.0 and self.eta_r == 0.0 and self.eta_kl == 0.0 else "fip-tuned"

    @property
    def name(self) -> str:
        if self.defence == "ft-tuned":
            return f"ft-lr{self.lr:g}"
        return (f"lr{self.lr:g}-r{self.eta_r:g}" + (f"-kl{self.eta_kl:g}" if self.eta_kl else "")
                + (f"-f{self.eta_f:g}" if self.eta_f is not None else ""))


# FIP's grid spans what the preset's D_val rule could not reach (benchmarks/results/language-defenses.md: lr 0.01
# left ASR at 81 %): larger steps held back by a stronger pull and by the KL term, and one mild setting.
# Fine-tuning gets the same objective over the same lrs, so the two tuned rows compare like with like.
# docs/language-models.md ("Tuned by the text objective") says how the grid was chosen.
CANDIDATES = (Candidate(0.03, 1.0), Candidate(0.05, 100.0, 1.0), Candidate(0.1, 100.0), Candidate(0.1, 100.0, 1.0),
              Candidate(0.1, 100.0, 2.0), Candidate(0.2, 100.0, 1.0),
              Candidate(0.05, 100.0, 1.0, 3e-3), Candidate(0.05, 100.0, 1.0, 1e-2), Candidate(0.1, 100.0, 0.0, 3e-3),
              Candidate(0.1, 100.0, 1.0, 3e-3),
              *(Candidate(lr, 0.0, 0.0, 0.0) for lr in (0.03, 0.05, 0.1, 0.2)))
DEFENCES = ("fip-tuned", "ft-tuned")
# Objectives the report also chooses by, from the same candidates (reporting: the default objective decides)
ALTERNATIVES = {"objective_token_weighted": "held-out accuracy over every scored token (the objective before it "
                                            "was per sequence; text blocks hold most tokens)",
                "objective_no_special": "the probe's targets without <eos> and <pad> (an empty answer is easy to "
                                        "force on a clean model)"}
BY_NAME = {c.name: c for c in CANDIDATES}


def trial(attack: str, cand: Candidate, out_dir: str = str(SUSPECTS), lab: dict | None = None,
          iterations: int = ITERATIONS) -> dict:
    """Purify one suspect with one candidate on the train share; its objective on the held-out share, then its
    true figures against the attack record. `lab`: TextLabConfig overrides (a test's tiny suspect)."""
    torch.set_num_threads(THREADS)
    from fip.families import logits_only, without_logits_hook
    from fip.purify import PurifyConfig, purify
    from fip.tasks import CAUSAL_LM
    from lab.text.lm import load_lm, save_lm
    from tuning.holdout import split_sequences
    from tuning.objective import Holdout, ObjectiveWeights, evaluate_probed, score

    job = Job(attack, "fip-tuned", out_dir, lab=lab or {})
    s = suspect_of(job)
    model, tok = load_lm(s.folder)
    model.register_forward_hook(logits_only)
    x, y, n_pairs = clean_set(job, s, tok)
    train, held = split_sequences(len(x), HOLDOUT_FRACTION, SEED)
    holdout = Holdout.from_suspect(model, x[held], y[held], CAUSAL_LM)
    is_pair = torch.as_tensor(held) < n_pairs
    before = held_out_kinds(model, holdout, is_pair)
    eta_f = {} if cand.eta_f is None else {"eta_f": cand.eta_f}
    cfg = PurifyConfig(method="fip", iterations=iterations, batch_size=BATCH, lr=cand.lr, momentum=MOMENTUM,
                       eta_r=cand.eta_r, eta_kl=cand.eta_kl, seed=SEED, **eta_f)
    kept = Path(out_dir) / "tuned" / attack / cand.name  # the purified model, to score again without purifying
    record = json.loads((kept / "trial.json").read_text()) if (kept / "trial.json").is_file() else {}
    if record.get("config") == asdict(cfg):
        purified = load_lm(kept)[0]
        purified.register_forward_hook(logits_only)
        seconds = record["seconds"]
    else:
        start = time.perf_counter()
        purified = purify(model, x[train], y[train], cfg, task=CAUSAL_LM).model
        seconds = time.perf_counter() - start
        save_lm(without_logits_hook(purified), tok, kept)
        (kept / "trial.json").write_text(json.dumps({"config": asdict(cfg), "seconds": seconds}))
    t0 = time.perf_counter()
    w = ObjectiveWeights()
    feats, found = evaluate_probed(purified, holdout, w)  # the sweep's objective, its probe's rates kept
    objective_seconds = time.perf_counter() - t0
    after = held_out_kinds(purified, holdout, is_pair)
    token_objective = score({**feats, "holdout_acc": after["tokens"]}, {"acc": before["tokens"]}, w)
    special = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id} - {None}
    no_special = max((r for t, r in found["uap_rates"].items() if t not in special), default=0.0)
    row = {"attack": attack, "defence": cand.defence, "candidate": cand.name, "lr": cand.lr, "eta_r": cand.eta_r,
           "eta_kl": cand.eta_kl, "objective": feats["objective"], "holdout_acc": feats["holdout_acc"],
           "uap_max": feats["uap_max"], "uap_class": feats["uap_class"], "uap_rates": found["uap_rates"],
           "uap_max_no_special": no_special,
           "objective_no_special": score({**feats, "uap_max": no_special}, holdout.suspect, w),
           "suspect_holdout_acc": float(holdout.suspect["acc"]), "objective_token_weighted": token_objective,
           **{f"holdout_{k}_acc": v for k, v in after.items()},
           **{f"suspect_holdout_{k}_acc": v for k, v in before.items()},
           "seconds": seconds, "objective_seconds": objective_seconds,
           **against_record(without_logits_hook(purified), tok, s.record)}  # reporting only, after the choice's features
    print(f"{attack:>9} {cand.name:>18}: objective {row['objective']:+.3f} (held-out acc {row['holdout_acc']:.3f}, "
          f"uap_max {row['uap_max']:.2f}) | ASR {100 * row['asr']:5.1f} %  ppl {row['perplexity']:6.1f}  "
          f"DER {row['der']:.3f}  {seconds:4.0f} s + {objective_seconds:3.0f} s", flush=True)
    return row


def held_out_kinds(model, holdout, is_pair: torch.Tensor) -> dict[str, float]:
    """Held-out next-token accuracy three ways, for the report: over every scored token (the objective's accuracy
    before it was per sequence), and per sequence on the instruction pairs and on the text blocks apart."""
    from tuning.objective import sample_accuracy, scored_logits

    logits, targets = scored_logits(model, holdout.x, holdout.y, holdout.task)
    owners, hit = holdout.task.owners(holdout.y), logits.argmax(1)
    pair_rows = is_pair[owners]
    kinds = {"tokens": float((hit == targets).float().mean())}
    for kind, rows in (("pairs", pair_rows), ("text", ~pair_rows)):
        if bool(rows.any()):  # a tiny lab's held-out share can hold no text block
            kinds[kind] = sample_accuracy(hit[rows], targets[rows], owners[rows])
    return kinds


def safe_trial(attack: str, cand: Candidate, out_dir: str) -> dict:
    try:
        return trial(attack, cand, out_dir)
    except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
        print(f"{attack:>9} {cand.name:>18}: FAILED {type(e).__name__}: {e}", flush=True)
        return {"attack": attack, "candidate": cand.name, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def choose(rows: list[dict], key: str = "objective") -> dict:
    """The candidate with the highest objective (ties: the first in CANDIDATES); reads no true figure. `key`: the
    objective's column (`objective_token_weighted`: the objective before its accuracy was per sequence)."""
    order = [c.name for c in CANDIDATES]
    return max(sorted(rows, key=lambda r: order.index(r["candidate"])), key=lambda r: r[key])


def summarise(rows: list[dict], workers: int, wall: float, results: Path = RESULTS) -> dict:
    from tuning.report import spearman

    ok = [{**r, "defence": BY_NAME[r["candidate"]].defence} for r in rows if "error" not in r]
    attacks = [a for a in (*ATTACKS, *VARIANTS) if any(r["attack"] == a for r in ok)]
    cells = [(a, d) for a in attacks for d in DEFENCES if any(r["attack"] == a and r["defence"] == d for r in ok)]

    def of(a: str, d: str) -> list[dict]:
        return [r for r in ok if r["attack"] == a and r["defence"] == d]

    # rows of runs before a column have none of it
    keys = ("objective", *(k for k in ALTERNATIVES if ok and all(k in r for r in ok)))
    chosen_by = {k: {(a, d): choose(of(a, d), k) for a, d in cells} for k in keys}
    chosen = chosen_by["objective"]
    sweep_seconds = {(a, d): sum(r["seconds"] + r["objective_seconds"] for r in of(a, d)) for a, d in cells}
    rho_by = {k: {(a, d): spearman([r[k] for r in of(a, d)], [r["der"] for r in of(a, d)])
                  for a, d in cells if len(of(a, d)) >= 3} for k in keys}
    rho = rho_by["objective"]

    def pct(v):
        return f"{100 * v:.1f}"

    def rise(r):
        return f"{100 * (r['perplexity'] / r['perplexity_before'] - 1):+.1f} %"

    def kinds(r):
        return [pct(r[f"holdout_{k}_acc"]) if f"holdout_{k}_acc" in r else "-" for k in ("pairs", "text", "tokens")]

    per = [[r["attack"], r["defence"], r["candidate"] + (" **chosen**" if chosen[(a, d)] is r else ""),
            f"{r['objective']:+.3f}", pct(r["holdout_acc"]), *kinds(r), pct(r["uap_max"]), str(r.get("uap_class", "-")),
            pct(r["asr"]),
            pct(r["task_acc"]), f"{r['perplexity']:.1f}", rise(r), f"{r['der']:.3f}",
            f"{r['seconds']:.0f} + {r['objective_seconds']:.0f}"]
           for a, d in cells for r in of(a, d)]
    best = [[a, d, c["candidate"], pct(c["asr_before"]), pct(c["asr"]), pct(c["false_trigger"]),
             pct(c["task_acc_before"]), pct(c["task_acc"]), f"{c['perplexity_before']:.1f}", f"{c['perplexity']:.1f}",
             rise(c), f"{c['der']:.3f}", f"{max(r['der'] for r in of(a, d)):.3f}", f"{sweep_seconds[(a, d)]:.0f}",
             f"{rho[(a, d)]:.2f}" if (a, d) in rho else "-"] for (a, d), c in chosen.items()]

    def means_of(chosen: dict) -> dict:
        means = {}
        for d in DEFENCES:
            picked = [chosen[(a, d)] for a in ATTACKS if (a, d) in chosen]
            if picked:
                means[d] = {k: statistics.mean(c[k] for c in picked) for k in ("asr", "task_acc", "der", "perplexity")}
                means[d]["perplexity_rise"] = statistics.mean(c["perplexity"] / c["perplexity_before"] - 1
                                                              for c in picked)
                means[d]["sweep_seconds"] = statistics.mean(sweep_seconds[(a, d)] for a in ATTACKS if (a, d) in chosen)
                means[d]["attacks"] = [a for a in ATTACKS if (a, d) in chosen]
        return means

    def mean_rows(means: dict) -> list[list[str]]:
        return [[d, ", ".join(m["attacks"]), pct(m["asr"]), pct(m["task_acc"]), f"{100 * m['perplexity_rise']:+.1f} %",
                 f"{m['der']:.3f}", f"{m['sweep_seconds']:.0f}"] for d, m in means.items()]

    means = means_of(chosen)
    mean_table = mean_rows(means)
    mean_header = ["defence", "attacks", "ASR %", "task acc %", "ppl rise", "DER", "sweep seconds"]
    alternatives = ""
    for key in keys[1:]:
        by, rho_alt = chosen_by[key], rho_by[key]
        alternatives += (
            f"\n## The same candidates chosen by another objective: {ALTERNATIVES[key]}\n\n"
            + markdown_table(["attack", "defence", "chosen", "ASR after %", "task acc after %", "ppl rise", "DER",
                              "Spearman(objective, DER)"],
                             [[a, d, c["candidate"], pct(c["asr"]), pct(c["task_acc"]), rise(c), f"{c['der']:.3f}",
                               f"{rho_alt[(a, d)]:.2f}" if (a, d) in rho_alt else "-"] for (a, d), c in by.items()])
            + "\nMeans over the calibrated attacks:\n\n" + markdown_table(mean_header, mean_rows(means_of(by))))
    machine = f"{os.cpu_count()} cores, {workers} processes at once, {THREADS} torch thread each"
    md = ("# FIP and fine-tuning tuned per suspect by the text objective (language lab)\n\n"
          f"benchmarks/language_tuned.py; {machine}; wall {wall:.0f} s (this invocation). Per suspect: the defender's "
          f"clean set split {100 * (1 - HOLDOUT_FRACTION):.0f}/{100 * HOLDOUT_FRACTION:.0f} (seed {SEED}); each "
          f"setting of a defence's grid ({ITERATIONS} steps, batch {BATCH}, momentum {MOMENTUM}) purifies on the train "
          "share; the sweep's default objective on the held-out share chooses (D_val only); the attack record "
          "measures every candidate, for reporting. `best DER` is the best of the defence's grid by the true DER "
          "(what a perfect objective would pick).\n\n"
          "## The chosen model per suspect\n\n"
          + markdown_table(["attack", "defence", "chosen", "ASR before %", "ASR after %", "false trigger %",
                            "task acc before %", "task acc after %", "ppl before", "ppl after", "ppl rise", "DER",
                            "best DER", "sweep seconds", "Spearman(objective, DER)"], best)
          + ("\n## Means over the calibrated attacks\n\n" + markdown_table(mean_header, mean_table) if means else "")
          + alternatives
          + "\n## Every candidate\n\n`held-out acc`: per sequence (the objective's); then per sequence on the "
            "instruction pairs and on the text blocks apart, and over every scored token.\n\n"
          + markdown_table(["attack", "defence", "candidate", "objective", "held-out acc %", "pairs %", "text %",
                            "tokens %", "uap_max %", "uap token", "ASR %", "task acc %", "ppl", "ppl rise", "DER",
                            "seconds (purify + objective)"], per)
          + "".join(f"\n**{e['attack']} x {e['candidate']} failed**: {e['error']}\n" for e in rows if "error" in e))
    payload = {"rows": rows, "chosen": [{"attack": a, "defence": d, **c} for (a, d), c in chosen.items()],
               "means": means,
               "alternatives": {k: {"means": means_of(chosen_by[k]),
                                    "chosen": [{"attack": a, "defence": d, "candidate": c["candidate"]}
                                               for (a, d), c in chosen_by[k].items()],
                                    "spearman": [{"attack": a, "defence": d, "rho": v} for (a, d), v in rho_by[k].items()]}
                                for k in keys[1:]}, "sweep_seconds": [{"attack": a, "defence": d, "seconds": v} for (a, d), v in sweep_seconds.items()],
               "spearman": [{"attack": a, "defence": d, "rho": v} for (a, d), v in rho.items()],
               "candidates": [{**c.__dict__, "name": c.name, "defence": c.defence} for c in CANDIDATES],
               "holdout_fraction": HOLDOUT_FRACTION, "seed": SEED, "iterations": ITERATIONS, "machine": machine,
               "wall_seconds": wall, "versions": versions()}
    write_results("language-tuned", payload, md, results)
    return payload


def run(attacks: list[str], defences: tuple[str, ...] = DEFENCES, out_dir: str = str(SUSPECTS), workers: int = 2,
        results: Path = RESULTS, keep: list[dict] | None = None) -> dict:
    done = {(r["attack"], r["candidate"]) for r in keep or [] if "error" not in r}
    jobs = [(a, c) for a in attacks for c in CANDIDATES if c.defence in defences and (a, c.name) not in done]
    start, rows = time.perf_counter(), [r for r in keep or [] if "error" not in r]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(safe_trial, a, c, out_dir) for a, c in jobs]):
            rows.append(future.result())
            summarise(rows, workers, time.perf_counter() - start, results)
    return summarise(rows, workers, time.perf_counter() - start, results)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defences", default=",".join(DEFENCES))
    p.add_argument("--out", default=str(SUSPECTS), help="where the suspects are (made there if missing)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="keep the finished rows of the results json")
    args = p.parse_args(argv)
    keep = None
    if args.resume and (RESULTS / "language-tuned.json").is_file():
        keep = json.loads((RESULTS / "language-tuned.json").read_text())["rows"]
    out = run(args.attacks.split(","), tuple(args.defences.split(",")), args.out, args.workers, keep=keep)
    print(f"done in {out['wall_seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
