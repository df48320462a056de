"""Make a backdoored model: D_val held out, poison, train, measure, and write model + record.

Outputs in `out_dir`, named ``<stem>-<hash>`` (:attr:`LabConfig.name`): a readable stem (attack,
data set, arch, width, target, poison rate, seed, augmentation) and a short hash of every setting
that can change the model or its record (:meth:`LabConfig.cache_config`), so a cached model is
reused only for exactly the configuration that made it:
``<name>.safetensors`` (+ ``.json`` sidecar), ``<name>.record.json`` (what was done and measured),
``<name>.trigger.safetensors`` (learned trigger state, when the attack has one),
``reference-...-<hash>.safetensors`` (the clean model LC and Trojan fit against) and
``dval-<dataset>-f<clean_fraction>-s<dval_seed>.json`` (the defender's clean-set indices; shared by
every model made with the same split, whatever its attack seed).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fip import families
from fip.inputs import ADAPTER_KEY, NORMALIZATION_KEY, InputAdapter, attach_inputs
from fip.io import load_model, save_model
from fip.models import ModelSpec, build_model, spec_for
from lab.attacks import (
    Attack,
    AttackConfig,
    InputAware,
    attack_class,
    build_attack,
    default_epochs,
    seeded_global_rng,
    trigger_params,
)
from lab.datasets import CleanSplit, DatasetError, ImageSet, clean_split, dataset_info, load_dataset, without
from lab.metrics import evaluate_model
from lab.train import TrainConfig, train_classifier

# Bump when what goes into the key, or how a model is made from it, changes: every name changes with it.
CACHE_SCHEME = 2
HASH_CHARS = 10

# LabConfig fields left out of the cache key, and why.
NOT_IN_CACHE_KEY = {
    "root": "where the data set's files lie, not which data set: the same data under another folder gives "
            "the same model (a D_val file is never overwritten by a different split, see save_dval)",
}


def canonical(value: object) -> object:
    """JSON-ready form of a config: nested dataclasses as dicts, tuples as lists, ints in float fields as floats.

    So that ``width=1`` and ``width=1.0`` (the same model) hash alike. Trigger parameters keep their
    types: an attack may read them as it likes.
    """
    if is_dataclass(value) and not isinstance(value, type):
        hints = typing.get_type_hints(type(value))
        out = {}
        for f in fields(value):
            v = getattr(value, f.name)
            hint = hints.get(f.name)
            kinds = set(typing.get_args(hint)) | {hint}
            if float in kinds and int not in kinds and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            out[f.name] = canonical(v)
        return out
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def short_hash(payload: object) -> str:
    """A short, stable hash of a JSON-ready payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


def dval_file_name(dataset: str, clean_fraction: float, dval_seed: int) -> str:
    """The D_val index file for one split: named by exactly what decides it (data set, fraction, split seed).

    ``repr`` of the fraction round-trips the float, so two different fractions never share a name
    (``:g`` would print 0.01 and 0.010000001 alike); the attack seed is not part of it, on purpose.
    """
    return f"dval-{dataset}-f{float(clean_fraction)!r}-s{int(dval_seed)}.json"


@dataclass
class LabConfig:
    """One backdoored model: data set, architecture, attack, training recipe, D_val."""

    attack: AttackConfig = field(default_factory=lambda: AttackConfig("badnets"))
    dataset: str = "fashion-mnist"
    root: str | None = None
    arch: str = "preactresnet18"  # ours, or a family model: torchvision:<builder>, timm:<name>, hf:<folder>
    width: float = 0.125  # ours only
    image_size: int | None = None  # a family model's input size (None: the data's); the model resizes its input
    arch_options: dict = field(default_factory=dict)  # a family model's builder keywords (timm: patch_size, depth)
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
        """The readable part of the file names (not unique: see :attr:`name`)."""
        a = self.attack
        mode = "a2a" if a.all_to_all else f"t{a.target}"
        aug = f"-aug{self.train.augment_pad}" if self.train.augment_pad else ""
        return f"{a.name}-{self.dataset}-{arch_stem(self.arch)}-w{self.width:g}-{mode}-p{a.poison_rate:g}-s{a.seed}{aug}"

    def cache_config(self) -> dict:
        """Every setting that can change the model or its record, normalised: the source of :attr:`config_hash`.

        Trigger parameters are merged with the attack's defaults (spelling out a default is the same
        model); settings the chosen attack ignores are blanked (the target under all-to-all
        labelling, `reference_epochs` for attacks without a reference model); ``train_limit`` and
        ``test_limit`` of 0 mean none. `test_limit` stays in: it does not change the weights, but
        the record's ACC/ASR/RA are measured on that many test images, and a hit returns the record.
        Fields in :data:`NOT_IN_CACHE_KEY` are left out. Unknown attacks or parameters raise here.
        """
        cls = attack_class(self.attack.name)
        d = canonical(self)
        for name in NOT_IN_CACHE_KEY:
            d.pop(name)
        a = d["attack"]
        a["params"] = canonical(trigger_params(self.attack))
        if a["all_to_all"]:
            a["target"] = None
        if not cls.needs_reference_model:
            d["reference_epochs"] = None
        d["train_limit"] = self.train_limit or None
        d["test_limit"] = self.test_limit or None
        for name, unset in (("image_size", None), ("arch_options", {})):  # left out unset: older hashes stay valid
            if d[name] == unset:
                d.pop(name)
        d["scheme"] = CACHE_SCHEME
        return d

    @property
    def config_hash(self) -> str:
        return short_hash(self.cache_config())

    @property
    def name(self) -> str:
        """The model's file name (without suffix): ``<stem>-<config_hash>``."""
        return f"{self.stem}-{self.config_hash}"

    @property
    def dval_name(self) -> str:
        return dval_file_name(self.dataset, self.clean_fraction, self.dval_seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BackdoorArtifacts:
    model_path: Path
    record_path: Path
    dval_path: Path
    record: dict
    reused: bool = False  # True: a cached model with the same config hash was returned, nothing trained
    config_hash: str = ""


def arch_stem(arch: str) -> str:
    """`arch` as a file-name part: ``torchvision-resnet18``, ``timm-vit_tiny_patch16_224``, ``hf-<folder name>``."""
    source, _, name = arch.rpartition(":") if ":" in arch else ("", "", arch)
    return f"{source}-{Path(name).name}" if source else name


def model_spec(cfg: LabConfig, data: ImageSet) -> ModelSpec:
    """Ours at the data's geometry; a family model with its own channels (torchvision's are 3) at
    `cfg.image_size` (default: the data's), the classes of the data set, and `cfg.arch_options`."""
    c, h, _ = data.shape
    if ":" not in cfg.arch:
        return ModelSpec(cfg.arch, data.num_classes, c, h, cfg.width)
    channels = 3 if cfg.arch.startswith("torchvision:") else c
    return spec_for(cfg.arch, num_classes=data.num_classes, in_channels=channels, image_size=cfg.image_size or h,
                    options=cfg.arch_options or None)


def input_side(spec: ModelSpec, data: ImageSet) -> dict:
    """The input metadata a lab model is trained and saved with (:mod:`fip.inputs`): an adapter when the network
    takes another geometry than the data, and the family's default normalisation (none for ours)."""
    meta = {}
    if tuple(data.shape) != spec.input_shape:
        meta[ADAPTER_KEY] = InputAdapter(tuple(data.shape)).to_metadata()
    norm = families.default_normalization(spec)
    if norm is not None:
        meta[NORMALIZATION_KEY] = norm
    return meta


def seeded_model(spec: ModelSpec, seed: int, inputs: dict | None = None) -> nn.Module:
    """`build_model(spec)` with its initial weights fixed by `seed`, taking the data as `inputs` (its input metadata)
    say; the caller's global RNG is left as it was.

    The weights equal those of ``torch.manual_seed(seed); build_model(spec)`` (what the lab did before).
    """
    with seeded_global_rng(seed):
        model = build_model(spec)
    return attach_inputs(model, spec.input_shape, inputs)


def load_lab_model(path: str | Path) -> nn.Module:
    """A model the lab wrote, runnable on the data's ``[0, 1]`` images: its recorded input adapter and
    normalisation attached (ours records neither, so it is the bare network)."""
    loaded = load_model(path)
    return attach_inputs(loaded.model, loaded.spec.input_shape, loaded.metadata)


def load_lab_data(cfg: LabConfig) -> tuple[ImageSet, ImageSet, CleanSplit]:
    """Train and test splits, and D_val (class-balanced, fixed by seed, from the training split)."""
    dataset_info(cfg.dataset)
    train = load_dataset(cfg.dataset, "train", cfg.root)
    test = load_dataset(cfg.dataset, "test", cfg.root)
    if cfg.test_limit:
        test = test.subset(range(min(cfg.test_limit, len(test))))
    return train, test, clean_split(train, cfg.clean_fraction, cfg.dval_seed, cfg.dataset)


def save_dval(split: CleanSplit, path: Path) -> Path:
    """Write the D_val index file, refusing to replace one that holds a different split.

    The name fixes data set, fraction and split seed; different indices under it mean the data
    themselves differ (another `root`), and overwriting would silently change the D_val of every
    model already made with that file.
    """
    try:
        old = CleanSplit.load(path) if path.is_file() else None
    except DatasetError:
        old = None  # unreadable: rewrite it
    if old is None:
        return split.save(path)
    if old.indices != split.indices:
        raise DatasetError(f"{path} holds a different D_val (sha256 {old.digest}) than this split ({split.digest}): "
                           "the data set differs from the one that wrote it; use another output folder")
    return path


def reference_cache_config(cfg: LabConfig) -> dict:
    """What the clean reference model depends on: its data (D_val removed, limit), init seed and recipe."""
    train = {**canonical(cfg.train), "epochs": cfg.reference_epochs}
    return {"scheme": CACHE_SCHEME, "dataset": cfg.dataset, "arch": cfg.arch, "width": float(cfg.width),
            "init_seed": cfg.attack.seed, "train": train, "clean_fraction": float(cfg.clean_fraction),
            "dval_seed": cfg.dval_seed, "train_limit": cfg.train_limit or None}


def reference_path(cfg: LabConfig, out_dir: Path) -> Path:
    stem = f"reference-{cfg.dataset}-{cfg.arch}-w{cfg.width:g}-s{cfg.attack.seed}-e{cfg.reference_epochs}"
    return out_dir / f"{stem}-{short_hash(reference_cache_config(cfg))}.safetensors"


def reference_model(cfg: LabConfig, train: ImageSet, out_dir: Path, progress: bool) -> nn.Module:
    """A clean model for attacks that need one (cached beside the outputs, keyed like the models)."""
    spec = model_spec(cfg, train)
    inputs = input_side(spec, train)
    path = reference_path(cfg, out_dir)
    if path.is_file():
        return load_lab_model(path)
    model = seeded_model(spec, cfg.attack.seed, inputs)
    tcfg = TrainConfig(**{**cfg.train.to_dict(), "epochs": cfg.reference_epochs})
    train_classifier(model, train, tcfg, progress=progress, desc="reference model")
    save_model(model, spec, path, {**inputs, "role": "clean reference", "epochs": cfg.reference_epochs,
                                   "config_hash": short_hash(reference_cache_config(cfg))})
    return model


def make_backdoored_model(cfg: LabConfig, out_dir: str | Path, progress: bool = True, reuse: bool = True) -> BackdoorArtifacts:
    """Run the attacker: returns the paths and the record (ACC/ASR/RA measured on the test set).

    With `reuse`, a model already made with the same config hash is returned as it is
    (``reused=True``) and nothing is trained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = cfg.cache_config()  # refuses unknown attacks and parameters before any work
    chash = short_hash(config)
    name = f"{cfg.stem}-{chash}"
    model_path = out_dir / f"{name}.safetensors"
    record_path = out_dir / f"{name}.record.json"
    if reuse and model_path.is_file() and record_path.is_file():
        record = relocated(json.loads(record_path.read_text()), out_dir)
        if record.get("config_hash") == chash:
            return BackdoorArtifacts(model_path, record_path, Path(record["dval_path"]), record, True, chash)

    start = time.perf_counter()
    full_train, test, split = load_lab_data(cfg)
    dval_path = save_dval(split, out_dir / cfg.dval_name)
    train, _ = without(full_train, split)
    if cfg.train_limit:
        train = train.subset(range(min(cfg.train_limit, len(train))))
    attack = build_attack(cfg.attack, train.shape, train.num_classes)
    ref_path = None
    if attack.needs_reference_model:
        attack.fit(train, reference_model(cfg, train, out_dir, progress))
        ref_path = reference_path(cfg, out_dir)
    poisoned = attack.poison(train)

    spec = model_spec(cfg, train)
    inputs = input_side(spec, train)
    model = seeded_model(spec, cfg.train.seed, inputs)
    extra = {}
    if isinstance(attack, InputAware):
        gen_opt = attack.optimizer()
        extra = {"loss_fn": attack.training_loss, "extra_optimizers": [gen_opt]}
    stats = train_classifier(model, poisoned.data, cfg.train, progress=progress, desc=f"{attack.name} model", **extra)
    metrics = evaluate_model(model, test.floats(), test.y, attack.trigger_floats, attack.target_of)
    seconds = time.perf_counter() - start

    trigger_path = None
    if attack.state_tensors():
        trigger_path = out_dir / f"{name}.trigger.safetensors"
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
        "data_shape": list(train.shape),
        "acc": metrics["acc"],
        "asr": metrics["asr"],
        "ra": metrics["ra"],
        "seconds": round(seconds, 2),
        "train_seconds": round(stats["seconds"], 2),
        "trained_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_path": str(model_path),
        "trigger_path": str(trigger_path) if trigger_path else None,
        "reference_path": str(ref_path) if ref_path else None,
        "dval_path": str(dval_path),
        "dval_sha256_16": split.digest,
        "config_hash": chash,
        "cache_config": config,
        "lab_config": cfg.to_dict(),
        "versions": versions(),
    }
    save_model(model, spec, model_path, {**inputs, "attack_record": record_path.name, "attack": cfg.attack.name,
                                         RECORD_LINK_KEY: chash})
    record_path.write_text(json.dumps(record, indent=2, default=str))
    return BackdoorArtifacts(model_path, record_path, dval_path, record, False, chash)


# The model metadata key, and attack record field, that tie a lab model to its record: the lab config hash.
# A model purified from a lab model carries its suspect's value (pipeline.stages.purify_stage).
RECORD_LINK_KEY = "config_hash"


class RecordMismatch(ValueError):
    """An attack record was written for another model than the one it is used with."""


def check_record_belongs(metadata: dict, record: dict, model: str, record_name: str) -> str | None:
    """Refuse an attack record made for another model: its trigger and target would measure a backdoor the model
    does not have (an ASR near 0 % for a model whose ASR is 100 %). Returns a one-line warning when the link
    cannot be checked (a model brought by a user carries no lab config hash), else None."""
    ours, theirs = metadata.get(RECORD_LINK_KEY), record.get(RECORD_LINK_KEY)
    if ours and theirs and ours != theirs:
        raise RecordMismatch(f"attack record {record_name} ({RECORD_LINK_KEY} {theirs}) does not belong to the model "
                             f"{model} ({RECORD_LINK_KEY} {ours}): pass the record the lab wrote with that model")
    if ours and theirs:
        return None
    missing = f"the model carries no {RECORD_LINK_KEY}" if not ours else f"the record has no {RECORD_LINK_KEY}"
    return f"warning: cannot check that attack record {record_name} belongs to {model} ({missing}); the backdoor figures (ASR, RA, false triggers) assume it does"


RECORD_PATHS = ("model_path", "trigger_path", "reference_path", "dval_path")


def relocated(record: dict, folder: Path) -> dict:
    """`record` with each file it names that is not where the record says found beside the record instead.

    A record names its files by absolute path, as the lab wrote them; a cache that was moved, committed or
    cloned elsewhere (benchmarks/suspects) still holds them, next to the record."""
    out = dict(record)
    for key in RECORD_PATHS:
        value = out.get(key)
        if value and not Path(value).is_file() and (Path(folder) / Path(value).name).is_file():
            out[key] = str(Path(folder) / Path(value).name)
    return out


def attack_from_record(record: dict | str | Path, tensors: dict[str, torch.Tensor] | None = None) -> Attack:
    """Rebuild the attack (trigger included) from its JSON record, to measure ASR later.

    A learned trigger comes from `tensors` when given (e.g. shipped to remote workers), else from
    the record's ``trigger_path`` (or the file of that name beside a record read from a path: :func:`relocated`).
    """
    if not isinstance(record, dict):
        path = Path(record)
        try:
            record = relocated(json.loads(path.read_text()), path.parent)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not an attack record: {e}") from e
    try:
        spec = ModelSpec.from_dict(record["model_spec"])
        cfg = AttackConfig(record["attack"], record["target"], record["poison_rate"], record["all_to_all"], record["seed"], record["params"])
    except KeyError as e:
        raise ValueError(f"attack record lacks field {e}") from e
    attack = build_attack(cfg, tuple(record.get("data_shape") or spec.input_shape), spec.num_classes)
    if tensors:
        attack.load_state_tensors(tensors)
    elif record.get("trigger_path"):
        attack.load_state_tensors(load_file(record["trigger_path"]))
    return attack


def versions() -> dict:
    import numpy

    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
