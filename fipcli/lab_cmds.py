"""`fip attack`: make a backdoored model with the lab."""

from __future__ import annotations

import argparse
import json


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(sub) -> None:
    from lab.attacks import ATTACKS
    from lab.datasets import DATASETS

    p = sub.add_parser("attack", help="train a backdoored model (the lab) and write it with its attack record")
    p.add_argument("--attack", required=True, help=f"one of: {', '.join(ATTACKS)}")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--root", default=None, help="data set folder (Fashion-MNIST defaults to Debian's location)")
    p.add_argument("--arch", default="preactresnet18")
    p.add_argument("--width", type=float, default=0.125, help="channel width multiplier")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=None, help="fraction of the training set (default: the attack's own)")
    p.add_argument("--all-to-all", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="default: the attack's own (3; input-aware 4)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-fraction", type=float, default=0.01, help="D_val size as a fraction of the training set")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE", help="trigger parameter")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--out", default="runs/lab", help="output folder")
    p.add_argument("--force", action="store_true", help="retrain even if the model exists")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run)


def run(args) -> int:
    from lab.attacks import AttackConfig, default_epochs
    from lab.backdoor import LabConfig, make_backdoored_model
    from lab.train import TrainConfig

    cfg = LabConfig(
        attack=AttackConfig(args.attack, args.target, args.poison_rate, args.all_to_all, args.seed, dict(args.param)),
        dataset=args.dataset,
        root=args.root,
        arch=args.arch,
        width=args.width,
        train=TrainConfig(epochs=args.epochs or default_epochs(args.attack), lr=args.lr, batch_size=args.batch_size, seed=args.seed),
        clean_fraction=args.clean_fraction,
        train_limit=args.train_limit,
    )
    art = make_backdoored_model(cfg, args.out, progress=True, reuse=not args.force)
    r = art.record
    print(f"{r['attack']}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  ({r['seconds']:.0f}s)")
    print(f"model:  {art.model_path}\nrecord: {art.record_path}\nD_val:  {art.dval_path}")
    return 0
