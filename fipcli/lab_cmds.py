"""`fip attack`: make a backdoored model with the lab."""

from __future__ import annotations

import argparse
import json
import textwrap


def _param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _as_typed(value: object) -> str:
    """A default as one would type it after ``--param KEY=`` (JSON, bare strings unquoted)."""
    return value if isinstance(value, str) else json.dumps(value)


def attacks_help() -> str:
    """Per attack: its default poison rate and epochs, and its trigger parameters with their defaults.

    Generated from the registry, so it cannot drift from what the attacks actually use.
    """
    from lab.attacks import ATTACKS

    indent = " " * 16
    lines = ["attacks, their defaults, and their trigger parameters (set with --param KEY=VALUE):"]
    for name, cls in ATTACKS.items():
        notes = [f"poison rate {cls.default_poison_rate:g}", f"{cls.train_epochs} epochs"]
        if cls.clean_label:
            notes.append("clean-label (no --all-to-all)")
        if cls.needs_reference_model:
            notes.append("trains a clean reference model first")
        lines += textwrap.wrap(", ".join(notes), width=100, initial_indent=f"  {name:<13} ", subsequent_indent=indent,
                               break_long_words=False, break_on_hyphens=False)
        params = "  ".join(f"{k}={_as_typed(v)}" for k, v in cls.defaults.items()) or "(no trigger parameters)"
        lines += textwrap.wrap(params, width=100, initial_indent=indent, subsequent_indent=indent,
                               break_long_words=False, break_on_hyphens=False)
    lines.append("")
    lines.append("A model is cached under a name ending in a hash of every setting that changes it; an identical")
    lines.append("rerun reuses it (and says so), --force retrains.")
    return "\n".join(lines)


def register(sub) -> None:
    from lab.attacks import ATTACKS
    from lab.datasets import DATASETS

    p = sub.add_parser("attack", help="train a backdoored model (the lab) and write it with its attack record",
                       description="Train a backdoored model (the lab) and write it with its attack record.",
                       epilog=attacks_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", required=True, choices=list(ATTACKS), metavar="ATTACK",
                   help=f"one of: {', '.join(ATTACKS)} (see below)")
    p.add_argument("--dataset", default="fashion-mnist", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--root", default=None, help="data set folder (Fashion-MNIST defaults to Debian's location)")
    p.add_argument("--arch", default="preactresnet18",
                   help="ours (preactresnet18, resnet50, vgg11, vit-small), torchvision:<builder>, timm:<name> or "
                        "hf:<folder with config.json>")
    p.add_argument("--width", type=float, default=0.125, help="channel width multiplier (ours)")
    p.add_argument("--image-size", type=int, default=None,
                   help="a family model's input size (default: the data's); the model resizes its input itself")
    p.add_argument("--arch-option", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a family model's builder keyword, e.g. patch_size=4 for a timm ViT")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=None, help="fraction of the training set (default: the attack's own, below)")
    p.add_argument("--all-to-all", action="store_true")
    p.add_argument("--epochs", type=int, default=None, help="default: the attack's own (below)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--augment-pad", type=int, default=0,
                   help="random crop after this much zero padding, plus flips, while training (default 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean-fraction", type=float, default=0.01, help="D_val size as a fraction of the training set")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE", help="trigger parameter (below)")
    p.add_argument("--train-limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--out", default="runs/lab", help="output folder")
    p.add_argument("--force", action="store_true", help="retrain even if a model with the same settings exists")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run)


def _trained_at(art) -> str:
    stamp = art.record.get("trained_at")
    if stamp:
        return stamp.replace("T", " ").replace("+00:00", " UTC")
    from datetime import datetime

    return datetime.fromtimestamp(art.model_path.stat().st_mtime).isoformat(sep=" ", timespec="seconds")


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
        image_size=args.image_size,
        arch_options=dict(args.arch_option),
        train=TrainConfig(epochs=args.epochs or default_epochs(args.attack), lr=args.lr, batch_size=args.batch_size,
                          seed=args.seed, augment_pad=args.augment_pad),
        clean_fraction=args.clean_fraction,
        train_limit=args.train_limit,
    )
    art = make_backdoored_model(cfg, args.out, progress=True, reuse=not args.force)
    r = art.record
    if art.reused:
        print(f"reusing cached model {art.model_path} (trained {_trained_at(art)}, same config hash {art.config_hash}); "
              "--force retrains")
    print(f"{r['attack']}: ACC {100 * r['acc']:.2f}%  ASR {100 * r['asr']:.2f}%  RA {100 * r['ra']:.2f}%  ({r['seconds']:.0f}s)")
    print(f"model:  {art.model_path}\nrecord: {art.record_path}")
    print(f"D_val:  {art.dval_path} ({cfg.dataset}, clean fraction {cfg.clean_fraction:g}, split seed {cfg.dval_seed}; "
          "shared by every model with the same split seed and fraction, whatever its attack seed)")
    return 0
