"""The language preset's learning rates, chosen by a rule on D_val alone (never on ASR).

    python -m benchmarks.language_calibration            # the three lab suspects, 2 processes, 1 thread each

The rule: split the defender's clean set (lab.text.suspect.defender_clean_set: pairs and plain text) into a
fit part (3/4) and a check part (1/4), seeded; fine-tune each suspect on the fit part at every lr of a grid
(the preset's steps, batch and momentum); keep the LARGEST lr that, on every suspect, raises the held-out
text's cross-entropy by at most ``ln 1.05`` (the 5 % perplexity the defence may cost) and lowers the held-out
pairs' next-token accuracy on the responses by at most the preset's ``max_acc_drop`` (2 points, the pruning
rate's rule). A first version bounded the pairs' cross-entropy by ``ln 1.05`` too: no lr passed (it rose by
0.07-0.10 even at lr 0.01, where the accuracy moves 1-3 points), so it could not tell settings apart. Why the largest: a fine-tuning defence removes a backdoor by moving
the weights, and the held-out check says how far they may move before clean prediction pays. No lr passing:
the smallest. Plain FT is calibrated (its lr is then FIP's and pruning's too, so the table compares the
regularisers); Fast FIP is calibrated on its own grid, since it tunes singular-value shifts and norm weights
only, whose scale is not the weights' (its lr becomes the preset's ``fast_lr_scale`` x the shared lr).
Writes ``benchmarks/results/language-calibration.{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from multiprocessing import get_context

import torch

from benchmarks.common import RESULTS, markdown_table, write_results
from benchmarks.language_table import ATTACKS, PRESET, Job, LanguagePreset, clean_set, suspect_of

GRIDS = {"ft": (0.1, 0.03, 0.02, 0.01), "fast-fip": (2.0, 0.6, 0.2)}  # lr (Fast FIP: its effective lr), largest first
CHECK_SHARE = 0.25
CHECK_SEED = 7
MAX_RISE = math.log(1.05)  # cross-entropy rise allowed: 5 % of perplexity


def split_clean_set(x: torch.Tensor, y: torch.Tensor, n_pairs: int, share: float = CHECK_SHARE, seed: int = CHECK_SEED):
    """(fit x, fit y, {"pairs": (x, y), "text": (x, y)}): a seeded `share` of the pairs and of the text blocks held out."""
    g = torch.Generator().manual_seed(seed)
    fit, check = [], {}
    for kind, rows in (("pairs", torch.arange(n_pairs)), ("text", torch.arange(n_pairs, len(x)))):
        order = rows[torch.randperm(len(rows), generator=g)]
        k = round(share * len(rows))
        check[kind] = (x[order[:k]], y[order[:k]])
        fit.append(order[k:])
    keep = torch.cat(fit)
    return x[keep], y[keep], check


@torch.no_grad()
def check_figures(model, parts: dict) -> dict[str, float]:
    """Per held-out part: mean per-sequence cross-entropy (fip.tasks's causal-LM loss) and next-token accuracy."""
    from fip.tasks import CAUSAL_LM

    model.eval()
    out = {}
    for kind, (x, y) in parts.items():
        logits = model(input_ids=x).logits
        hits, n = CAUSAL_LM.hits(logits, y)
        out[f"{kind}_ce"], out[f"{kind}_acc"] = float(CAUSAL_LM.mean_nll(logits, y)), hits / n
    return out


def passes(t: dict, preset: LanguagePreset = PRESET) -> bool:
    """The rule's test of one trial: held-out text perplexity +5 % at most, held-out pair accuracy -2 points at most."""
    return t["text_ce"] - t["text_ce_before"] <= MAX_RISE and t["pairs_acc_before"] - t["pairs_acc"] <= preset.max_acc_drop


def trial(attack: str, defence: str, lr: float, preset: LanguagePreset = PRESET) -> dict:
    """Fine-tune one suspect on the fit part at `lr` (Fast FIP: its effective lr); the check cross-entropies."""
    torch.set_num_threads(preset.threads)
    from fip.families import logits_only, without_logits_hook
    from fip.purify import purify
    from fip.tasks import CAUSAL_LM
    from lab.text.lm import load_lm

    job = Job(attack, defence, preset=preset)
    s = suspect_of(job)
    model, tok = load_lm(s.folder)
    x, y, n_pairs = clean_set(job, s, tok)
    fx, fy, check = split_clean_set(x, y, n_pairs)
    before = check_figures(model, check)
    cfg = replace(preset.purify_config(defence), lr=lr, fast_lr_scale=1.0)
    start = time.perf_counter()
    model.register_forward_hook(logits_only)
    res = purify(model, fx, fy, cfg, task=CAUSAL_LM)
    after = check_figures(without_logits_hook(res.model), check)
    out = {"attack": attack, "defence": defence, "lr": lr, "seconds": time.perf_counter() - start,
           **{f"{k}_before": v for k, v in before.items()}, **after}
    out["passes"] = passes(out, preset)
    print(f"{attack:>9} {defence:>8} lr {lr:<5g}: text CE {out['text_ce_before']:.3f} -> {out['text_ce']:.3f}, "
          f"pairs CE {out['pairs_ce_before']:.3f} -> {out['pairs_ce']:.3f}, pairs acc {out['pairs_acc_before']:.3f} -> "
          f"{out['pairs_acc']:.3f}  {'pass' if out['passes'] else 'FAIL'}"
          f"  {out['seconds']:.0f} s", flush=True)
    return out


def choose(trials: list[dict], defence: str) -> float:
    """The rule: the largest lr of the grid that passes on every suspect; none passing: the smallest."""
    grid = sorted(GRIDS[defence], reverse=True)
    for lr in grid:
        rows = [t for t in trials if t["defence"] == defence and t["lr"] == lr]
        if rows and all(t["passes"] for t in rows):
            return lr
    return grid[-1]


def fixed_settings(preset: LanguagePreset = PRESET) -> dict:
    """The preset's settings the trials share (its lrs are what the rule chooses)."""
    return {k: v for k, v in asdict(preset).items() if k not in ("lr", "fast_lr_scale")}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    jobs = [(a, d, lr) for d, grid in GRIDS.items() for lr in grid for a in ATTACKS]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        trials = list(pool.map(trial, *zip(*jobs)))
    chosen = {d: choose(trials, d) for d in GRIDS}
    wall = time.perf_counter() - start
    rows = [[t["attack"], t["defence"], f"{t['lr']:g}", f"{t['text_ce_before']:.3f}", f"{t['text_ce']:.3f}",
             f"{t['pairs_ce_before']:.3f}", f"{t['pairs_ce']:.3f}", f"{100 * t['pairs_acc_before']:.1f}",
             f"{100 * t['pairs_acc']:.1f}", "yes" if t["passes"] else "no", f"{t['seconds']:.0f}"] for t in trials]
    md = ("# The language preset's learning rates, chosen on D_val alone\n\n"
          f"Rule (benchmarks/language_calibration.py): fit on {1 - CHECK_SHARE:.0%} of the defender's clean set, check "
          f"on the rest; the largest lr whose check text cross-entropy rises at most ln 1.05 = {MAX_RISE:.4f} and "
          f"whose check pairs' next-token accuracy drops at most {100 * PRESET.max_acc_drop:g} points, on every "
          f"suspect. {len(trials)} trials ({len(GRIDS['ft'])} FT lrs and "
          f"{len(GRIDS['fast-fip'])} Fast FIP lrs on each of the three lab suspects), {args.workers} processes, "
          f"1 thread each, {sum(t['seconds'] for t in trials):.0f} s of training, wall {wall:.0f} s. Steps, batch, "
          f"momentum: the preset's ({PRESET.iterations}, {PRESET.batch_size}, {PRESET.momentum}).\n\n"
          f"Chosen: FT / FIP / pruning lr **{chosen['ft']:g}**, Fast FIP effective lr **{chosen['fast-fip']:g}**.\n\n"
          + markdown_table(["attack", "defence", "lr", "text CE suspect", "text CE after", "pairs CE suspect",
                            "pairs CE after", "pairs acc suspect %", "pairs acc after %", "passes", "seconds"], rows))
    payload = {"trials": trials, "chosen": chosen, "grids": GRIDS, "check_share": CHECK_SHARE, "max_rise": MAX_RISE,
               "fixed": fixed_settings(), "wall_seconds": wall}
    write_results("language-calibration", payload, md, RESULTS)
    print(md)
    return payload


if __name__ == "__main__":
    main()
