"""Where Fast FIP's time goes, and what it costs against FIP at the same ASR (issue 12, item 4).

- Per step: one FIP and one Fast FIP step (with and without the trace term) under torch's
  profiler, CPU time grouped into convolution forward, convolution backward (first and second
  order), norm layers, the Fast FIP weight rebuild ``U diag(relu(s + delta)) V^T`` (matmuls) and the
  rest; plus the rebuild of every layer alone, forward and backward. Two shapes: the lab's
  PreActResNet-18 (x0.125, 28x28 grey) and the paper's (width 1, 32x32 RGB), batch 128.
- Per run: the lab's BadNets model on Fashion-MNIST (cached in ``.cache/lab``), FIP and Fast FIP as
  the defense table runs them (300 steps; Fast FIP with eta_r = 0), ACC and ASR every 25 steps on
  2000 test images; the steps and seconds each needs to bring ASR to the target.

    python -m benchmarks.fast_fip_bench [--threads 1] [--target 0.10] [--skip-run]

ASR here is for reporting only; nothing is chosen with it.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import CACHE, RESULTS, markdown_table, write_results
from fip.fisher import trainable_params
from fip.models import ModelSpec, build_model
from fip.purify import Purifier, PurifyConfig, prepare_model
from fip.spectral import SpectralShift

GROUPS = (
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "_convolution", "conv2d", "thnn_conv", "slow_conv")),
    ("norm layers", ("batch_norm", "layer_norm")),
    ("rebuild (matmul)", ("aten::mm", "aten::matmul", "aten::bmm")),
)


def _group(name: str) -> str:
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def step_profile(spec: ModelSpec, batch: int, repeat: int = 2) -> dict:
    torch.manual_seed(0)
    base = build_model(spec)
    x = torch.rand(batch, spec.in_channels, spec.image_size, spec.image_size)
    y = torch.randint(0, spec.num_classes, (batch,))
    out: dict = {}
    for method in ("fip", "fast-fip"):
        for with_trace in (False, True):
            cfg = PurifyConfig(method=method, batch_size=batch, trace_every=1 if with_trace else 10**9)
            work = prepare_model(base, cfg)
            p = Purifier(work, {n: torch.ones_like(q) for n, q in trainable_params(work).items()}, cfg)

            def step(p=p, with_trace=with_trace) -> None:
                p.step_count = 0 if with_trace else 1
                p.step(x, y)

            step()
            t = time.perf_counter()
            for _ in range(repeat):
                step()
            seconds = (time.perf_counter() - t) / repeat
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            shares: dict[str, float] = {}
            for ev in prof.key_averages():
                if ev.key.startswith("aten::") or ev.key.startswith("mkldnn"):
                    shares[_group(ev.key)] = shares.get(_group(ev.key), 0.0) + ev.self_cpu_time_total
            total = sum(shares.values())
            out[f"{method}{'+trace' if with_trace else ''}"] = {
                "seconds": seconds, "shares": {k: v / total for k, v in sorted(shares.items())}}
    # the rebuild alone: every layer's W', forward and backward
    work = prepare_model(base, PurifyConfig(method="fast-fip"))
    layers = [m for m in work.modules() if isinstance(m, SpectralShift)]

    def rebuild() -> None:
        sum(m.shifted_weight().sum() for m in layers).backward()

    rebuild()
    t = time.perf_counter()
    for _ in range(repeat):
        rebuild()
    out["rebuild_seconds"] = (time.perf_counter() - t) / repeat
    out["rebuild_share_of_plain_step"] = out["rebuild_seconds"] / out["fast-fip"]["seconds"]
    for m in ("fip", "fast-fip"):
        out[f"{m}-avg-every5"] = (4 * out[m]["seconds"] + out[f"{m}+trace"]["seconds"]) / 5
    out["fast_over_fip_step"] = out["fast-fip-avg-every5"] / out["fip-avg-every5"]
    return out


def run_to_target(target: float, acc_bar: float = 0.86, steps: int = 300, every: int = 10,
                  test_samples: int = 2000) -> dict:
    from fip.io import load_model
    from fip.purify import estimate_fbar, purify
    from lab.attacks import AttackConfig
    from lab.backdoor import LabConfig, attack_from_record, make_backdoored_model
    from lab.datasets import CleanSplit, load_dataset
    from lab.defenses import DEFENSES
    from lab.metrics import evaluate_model

    art = make_backdoored_model(LabConfig(attack=AttackConfig("badnets")), CACHE / "lab", progress=False)
    suspect = load_model(art.model_path).model
    attack = attack_from_record(art.record)
    dval = load_dataset("fashion-mnist", "train").subset(CleanSplit.load(art.dval_path).indices)
    test = load_dataset("fashion-mnist", "test").subset(range(test_samples))
    xt, yt = test.floats(), test.y
    out: dict = {"target_asr": target, "acc_bar": acc_bar, "steps": steps, "eval_every": every}
    for method in ("fip", "fast-fip"):
        params = dict(DEFENSES[method].params)  # as the defense table runs them
        cfg = PurifyConfig(method=method, iterations=steps, eval_every=every, seed=0, **params)
        spent = {"eval": 0.0}

        def evaluate(model, spent=spent) -> dict:
            t = time.perf_counter()
            m = evaluate_model(model, xt, yt, attack.trigger_floats, attack.target_of)
            spent["eval"] += time.perf_counter() - t
            return m

        t = time.perf_counter()
        estimate_fbar(prepare_model(suspect, cfg), dval.floats(), dval.y, cfg)  # what purify() does first
        fisher_s = time.perf_counter() - t
        torch.manual_seed(0)
        t = time.perf_counter()
        result = purify(suspect, dval.floats(), dval.y, cfg, evaluate)
        wall = time.perf_counter() - t - spent["eval"]
        curve = [{"step": e["step"], "acc": e["acc"], "asr": e["asr"]} for e in result.evaluations]
        reached = next((e for e in curve if e["asr"] <= target), None)
        good = next((e for e in curve if e["asr"] <= target / 2 and e["acc"] >= acc_bar), None)
        per_step = max(wall - fisher_s, 0.0) / steps
        out[method] = {"params": params, "seconds": wall, "fisher_seconds": fisher_s, "seconds_per_step": per_step,
                       "curve": curve, "steps_to_target": reached["step"] if reached else None,
                       "seconds_to_target": fisher_s + reached["step"] * per_step if reached else None,
                       "acc_at_target": reached["acc"] if reached else None,
                       "steps_to_good": good["step"] if good else None}
    a, b = out["fip"]["seconds_to_target"], out["fast-fip"]["seconds_to_target"]
    out["fip_over_fast_fip_at_target"] = a / b if a and b else None
    a, b = out["fip"]["steps_to_target"], out["fast-fip"]["steps_to_target"]
    out["fip_over_fast_fip_steps"] = a / b if a and b else None
    a, b = out["fip"]["steps_to_good"], out["fast-fip"]["steps_to_good"]
    out["fip_over_fast_fip_steps_good"] = a / b if a and b else None
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a busy machine)")
    p.add_argument("--target", type=float, default=0.10, help="ASR both methods must reach")
    p.add_argument("--skip-run", action="store_true", help="per-step profile only")
    p.add_argument("--skip-profile", action="store_true", help="the runs to the target only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    payload: dict = {"threads": args.threads, "profiles": {}}
    if args.skip_profile:  # keep the profiles of the last full run
        payload["profiles"] = json.loads((RESULTS / "fast_fip.json").read_text())["profiles"]
    for label, spec in (("lab x0.125 28x28", ModelSpec("preactresnet18", 10, 1, 28, 0.125)),
                        ("paper width 1 32x32", ModelSpec("preactresnet18", 10, 3, 32, 1.0))):
        if args.skip_profile:
            break
        payload["profiles"][label] = step_profile(spec, 128)
        print(f"[fast-fip] profiled {label}", flush=True)
    if not args.skip_run:
        payload["run"] = run_to_target(args.target)
    from lab.backdoor import versions

    payload["versions"] = versions()
    md = render(payload)
    write_results("fast_fip", payload, md)
    print(md)
    return payload


def render(payload: dict) -> str:
    groups = [g for g, _ in GROUPS] + ["other"]
    md = f"# Fast FIP against FIP ({payload['threads']} CPU thread(s), batch 128)\n\n## Per step\n\n"
    for label, prof in payload["profiles"].items():
        rows = []
        for key in ("fip", "fast-fip", "fip+trace", "fast-fip+trace"):
            r = prof[key]
            rows.append([key, f"{1e3 * r['seconds']:.0f}"] + [f"{100 * r['shares'].get(g, 0):.1f}" for g in groups])
        md += (f"### PreActResNet-18, {label}\n\n"
               + markdown_table(["step", "ms"] + [f"{g} %" for g in groups], rows)
               + f"\nEvery layer's rebuild alone, forward + backward: {1e3 * prof['rebuild_seconds']:.1f} ms "
                 f"({100 * prof['rebuild_share_of_plain_step']:.1f} % of a plain Fast FIP step). Fast FIP / FIP "
                 f"per step (trace every 5th): {prof['fast_over_fip_step']:.2f}x.\n\n")
    if "run" in payload:
        run = payload["run"]
        rows = []
        for m in ("fip", "fast-fip"):
            r = run[m]
            final = r["curve"][-1]
            rows.append([m, f"{r['fisher_seconds']:.1f}", f"{r['seconds_per_step'] * 1e3:.0f}",
                         r["steps_to_target"] or "not reached",
                         f"{r['seconds_to_target']:.1f}" if r["seconds_to_target"] else "-",
                         f"{100 * r['acc_at_target']:.2f}" if r["acc_at_target"] else "-",
                         r["steps_to_good"] or "not reached",
                         f"{100 * final['acc']:.2f} / {100 * final['asr']:.2f}"])
        ratio, steps = run["fip_over_fast_fip_at_target"], run["fip_over_fast_fip_steps"]
        md += (f"## Per run: lab BadNets (Fashion-MNIST), ASR <= {100 * run['target_asr']:.0f} % "
               f"(evaluated every {run['eval_every']} steps)\n\n"
               + markdown_table(["method", "Fisher s", "ms/step", "steps to target", "seconds to target",
                                 "ACC % there", f"steps to ASR <= {50 * run['target_asr']:.0f} % at ACC >= "
                                 f"{100 * run['acc_bar']:.0f} %", f"ACC / ASR % after {run['steps']}"], rows)
               + f"\nFIP / Fast FIP at the target: {f'{steps:.2f}x' if steps else 'n/a'} the steps, "
                 f"{f'{ratio:.2f}x' if ratio else 'n/a'} the seconds (per-step times from these runs; the "
                 f"profile above measures the two side by side). At ASR <= "
                 f"{50 * run['target_asr']:.0f} % with ACC >= {100 * run['acc_bar']:.0f} %: "
                 + (f"{run['fip_over_fast_fip_steps_good']:.2f}x" if run["fip_over_fast_fip_steps_good"] else "n/a")
                 + " the steps.\n")
    return md


if __name__ == "__main__":
    main()
