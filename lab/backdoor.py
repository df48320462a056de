"""Make a backdoored model: D_val held out, poison, train, measure, and write model + record.

Outputs in `out_dir` (named by attack, dataset, arch and seed):
``<name>.safetensors`` (+ ``.json`` sidecar), ``<name>.record.json`` (what was done and measured),
``<name>.trigger.safetensors`` (learned trigger state, when the attack has one) and
``dval-<dataset>-<seed>.json`` (the defender's clean-set indices, shared by every defense).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fip.io import load_model, save_model
from fip.models import ModelSpec, build_model
from lab.attacks import Attack, AttackConfig, InputAware, build_attack, default_epochs
from lab.datasets import CleanSplit, ImageSet, clean_split, dataset_info, load_dataset, without
from lab.metrics import evaluate_model
from lab.train import TrainConfig, train_classifier


@dataclass
class LabConfig:
    """One backdoored model: data set, architecture, attack, training recipe, D_val."""

    attack: AttackConfig = field(default_factory=lambda: AttackConfig("badnets"))
    dataset: str = "fashion-mnist"
    root: str | None = None
    arch: str = "preactresnet18"
    width: float = 0.125
    train: TrainConfig | None = None  # None: TrainConfig with the attack's default epochs
    clean_fraction: float = 0.01
    dval_seed: int = 0
    reference_epochs: int = 1  # clean reference model for LC / Trojan
    train_limit: int | None = None  # use only the first N attacker images (tests)
    test_limit: int | None = None

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = TrainConfig(epochs=default_epochs(self.attack.name))

    @property
    def stem(self) -> str:
        a = self.attack
        mode = "a2a" if a.all_to_all else f"t{a.target}"
        aug = f"-aug{self.train.augment_pad}" if self.train.augment_pad else ""
        return f"{a.name}-{self.dataset}-{self.arch}-w{self.width:g}-{mode}-p{a.poison_rate:g}-s{a.seed}{aug}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BackdoorArtifacts:
    model_path: Path
    record_path: Path
    dval_path: Path
    record: dict


def model_spec(cfg: LabConfig, data: ImageSet) -> ModelSpec:
    c, h, _ = data.shape
    return ModelSpec(cfg.arch, data.num_classes, c, h, cfg.width)


def load_lab_data(cfg: LabConfig) -> tuple[ImageSet, ImageSet, CleanSplit]:
    """Train and test splits, and D_val (class-balanced, fixed by seed, from the training split)."""
    dataset_info(cfg.dataset)
    train = load_dataset(cfg.dataset, "train", cfg.root)
    test = load_dataset(cfg.dataset, "test", cfg.root)
    if cfg.test_limit:
        test = test.subset(range(min(cfg.test_limit, len(test))))
    return train, test, clean_split(train, cfg.clean_fraction, cfg.dval_seed, cfg.dataset)


def reference_model(cfg: LabConfig, train: ImageSet, out_dir: Path, progress: bool) -> nn.Module:
    """A clean model for attacks that need one (cached beside the outputs)."""
    spec = model_spec(cfg, train)
    path = out_dir / f"reference-{cfg.dataset}-{cfg.arch}-w{cfg.width:g}-s{cfg.attack.seed}-e{cfg.reference_epochs}.safetensors"
    if path.is_file():
        return load_model(path).model
    torch.manual_seed(cfg.attack.seed)
    model = build_model(spec)
    tcfg = TrainConfig(**{**cfg.train.to_dict(), "epochs": cfg.reference_epochs})
    train_classifier(model, train, tcfg, progress=progress, desc="reference model")
    save_model(model, spec, path, {"role": "clean reference", "epochs": cfg.reference_epochs})
    return model


def make_backdoored_model(cfg: LabConfig, out_dir: str | Path, progress: bool = True, reuse: bool = True) -> BackdoorArtifacts:
    """Run the attacker: returns the paths and the record (ACC/ASR/RA measured on the test set)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / f"{cfg.stem}.safetensors"
    record_path = out_dir / f"{cfg.stem}.record.json"
    if reuse and model_path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        return BackdoorArtifacts(model_path, record_path, Path(record["dval_path"]), record)

    start = time.perf_counter()
    full_train, test, split = load_lab_data(cfg)
    dval_path = split.save(out_dir / f"dval-{cfg.dataset}-{cfg.dval_seed}.json")
    train, _ = without(full_train, split)
    if cfg.train_limit:
        train = train.subset(range(min(cfg.train_limit, len(train))))
    attack = build_attack(cfg.attack, train.shape, train.num_classes)
    if attack.needs_reference_model:
        attack.fit(train, reference_model(cfg, train, out_dir, progress))
    poisoned = attack.poison(train)

    torch.manual_seed(cfg.train.seed)
    spec = model_spec(cfg, train)
    model = build_model(spec)
    extra = {}
    if isinstance(attack, InputAware):
        gen_opt = attack.optimizer()
        extra = {"loss_fn": attack.training_loss, "extra_optimizers": [gen_opt]}
    stats = train_classifier(model, poisoned.data, cfg.train, progress=progress, desc=f"{attack.name} model", **extra)
    metrics = evaluate_model(model, test.floats(), test.y, attack.trigger_floats, attack.target_of)
    seconds = time.perf_counter() - start

    trigger_path = None
    if attack.state_tensors():
        trigger_path = out_dir / f"{cfg.stem}.trigger.safetensors"
        save_file(attack.state_tensors(), str(trigger_path))
    record = {
        "attack": cfg.attack.name,
        "params": attack.params,
        "target": cfg.attack.target,
        "all_to_all": cfg.attack.all_to_all,
        "poison_rate": cfg.attack.poison_rate,
        "num_poisoned": int(len(poisoned.poisoned)),
        "poisoned_index_hash": poisoned.poisoned_hash,
        "seed": cfg.attack.seed,
        "epochs": cfg.train.epochs,
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "width": cfg.width,
        "model_spec": spec.to_dict(),
        "acc": metrics["acc"],
        "asr": metrics["asr"],
        "ra": metrics["ra"],
        "seconds": round(seconds, 2),
        "train_seconds": round(stats["seconds"], 2),
        "model_path": str(model_path),
        "trigger_path": str(trigger_path) if trigger_path else None,
        "dval_path": str(dval_path),
        "dval_sha256_16": split.digest,
        "lab_config": cfg.to_dict(),
        "versions": versions(),
    }
    save_model(model, spec, model_path, {"attack_record": record_path.name, "attack": cfg.attack.name})
    record_path.write_text(json.dumps(record, indent=2, default=str))
    return BackdoorArtifacts(model_path, record_path, dval_path, record)


def attack_from_record(record: dict | str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Attack:
    """Rebuild the attack (trigger included) from its JSON record, to measure ASR later.

    A learned trigger comes from `tensors` when given (e.g. shipped to remote workers), else from
    the record's ``trigger_path``.
    """
    if not isinstance(record, dict):
        path = Path(record)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not an attack record: {e}") from e
    try:
        spec = ModelSpec.from_dict(record["model_spec"])
        cfg = AttackConfig(record["attack"], record["target"], record["poison_rate"], record["all_to_all"], record["seed"], record["params"])
    except KeyError as e:
        raise ValueError(f"attack record lacks field {e}") from e
    attack = build_attack(cfg, (spec.in_channels, spec.image_size, spec.image_size), spec.num_classes)
    if tensors:
        attack.load_state_tensors(tensors)
    elif record.get("trigger_path"):
        attack.load_state_tensors(load_file(record["trigger_path"]))
    return attack


def versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
