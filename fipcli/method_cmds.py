"""`fip smoothness`: Hessian lambda_max, Tr(H) and spectral density of a model on clean data."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("smoothness", help="Hessian lambda_max, Tr(H) and eigen-spectral density of a model")
    p.add_argument("--model", required=True, help="model weights (.safetensors, .pth with --arch, or an HF folder)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--samples", type=int, default=200, help="clean training images (the paper uses one batch of 200)")
    p.add_argument("--iters", type=int, default=100, help="power iterations for lambda_max, at most")
    p.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the lambda_max power iteration")
    p.add_argument("--trace-rel-stderr", type=float, default=0.02,
                   help="draw Hutchinson probes for Tr(H) until its standard error is this fraction of |Tr(H)|")
    p.add_argument("--max-probes", type=int, default=500, help="Hutchinson probes for Tr(H), at most")
    p.add_argument("--density-steps", type=int, default=0, help="Lanczos steps for the spectral density (0: skip)")
    p.add_argument("--plot", default=None, help="PNG path for the density plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    from fipcli.pipeline_cmds import add_model_flags

    add_model_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from fip.smoothness import plot_spectral_density, smoothness_report
    from fipcli.pipeline_cmds import model_settings_from_args
    from lab.datasets import load_dataset
    from pipeline.suspect import load_suspect

    loaded = load_suspect(args.model, model_settings_from_args(args))
    data = load_dataset(args.dataset, "train", args.root)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    batch = (data.floats()[idx], data.y[idx])
    density_steps = args.density_steps or (90 if args.plot else 0)
    report = smoothness_report(loaded.model, [batch], max_iter=args.iters, tol=args.tol, density_steps=density_steps,
                               seed=args.seed, trace_rel_stderr=args.trace_rel_stderr, max_probes=args.max_probes)
    if args.plot and report.density is not None:
        plot_spectral_density({args.model: report.density}, args.plot)
    tr = report.trace
    print(f"lambda_max = {report.lambda_max:.6g}, Tr(H) = {tr}", file=sys.stderr)
    if tr.probes >= args.max_probes and not tr.stderr <= args.trace_rel_stderr * abs(tr.value):
        print(f"warning: Tr(H) relative standard error {tr.rel_stderr:.2g} is above the target "
              f"{args.trace_rel_stderr:g} after {tr.probes} probes (raise --max-probes)", file=sys.stderr)
    print(json.dumps(report.as_dict()))
    return 0
