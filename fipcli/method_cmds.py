"""`fip smoothness`: Hessian lambda_max, Tr(H) and spectral density of a model on clean data."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("smoothness", help="Hessian lambda_max, Tr(H) and eigen-spectral density of a model")
    p.add_argument("--model", required=True, help="model weights (.safetensors)")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--root", default=None)
    p.add_argument("--samples", type=int, default=200, help="clean training images (the paper uses one batch of 200)")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--density-steps", type=int, default=0, help="Lanczos steps for the spectral density (0: skip)")
    p.add_argument("--plot", default=None, help="PNG path for the density plot")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run)


def run(args) -> int:
    import torch

    from fip.io import load_model
    from fip.smoothness import plot_spectral_density, smoothness_report
    from lab.datasets import load_dataset

    loaded = load_model(args.model)
    data = load_dataset(args.dataset, "train", args.root)
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    batch = (data.floats()[idx], data.y[idx])
    density_steps = args.density_steps or (90 if args.plot else 0)
    report = smoothness_report(loaded.model, [batch], args.iters, args.tol, density_steps, args.seed)
    if args.plot and report.density is not None:
        plot_spectral_density({args.model: report.density}, args.plot)
    print(json.dumps(report.as_dict()))
    return 0
