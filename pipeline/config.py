"""One typed, nested config per job, and the one way to build it: defaults < preset < files < flags.

:class:`JobConfig` is plain data. The CLI, a Ray Tune trial and a submitted Ray job all build one
the same way (:func:`load_job_config`), the driver sends it to the Ray Train workers as it is
(``to_dict`` / ``from_dict``), and MLflow logs it as params. Every value is type-checked where it
enters (:func:`build`): unknown keys, wrong types, ``30.5`` for an int or ``"no"`` for a bool end
in one line naming the setting.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any, Literal

from fip.purify import PurifyConfig
from pipeline.storage import StorageSettings


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range; the message names it."""


# ---------------------------------------------------------------- the sections
@dataclass
class Inputs:
    """What the defender brings: the suspect model and D_val; test shards and an attack record are
    for reporting only (benchmark mode), never for choosing anything."""

    model: str
    clean: str
    test: str | None = None
    attack_record: str | None = None


@dataclass
class ModelSettings:
    """How to read the suspect model when its file does not say (a torchvision ``.pth``, a timm state dict) or
    says something else than the user wants. ``arch`` names it: ours, ``torchvision:<builder>``,
    ``timm:<name>`` or ``hf:<folder>``; the numbers left out come from the family's defaults
    (:func:`fip.models.spec_for`). ``normalize``: ``auto`` (the file's record, else the family's default),
    ``off``, ``imagenet`` or ``MEAN/STD``. ``data_shape``: ``C,H,W`` of the data's images when the network
    takes another geometry (gray repeated to its channels, a bilinear resize inside the model). ``options``:
    the family builder's keywords (a JSON object on the command line)."""

    arch: str | None = None  # None: the file's own spec (our safetensors files, HF folders)
    num_classes: int | None = None
    in_channels: int | None = None
    image_size: int | None = None
    normalize: str = "auto"
    data_shape: str | None = None
    options: dict = field(default_factory=dict)  # builder keywords of a family model (timm: patch_size, depth)

    def __post_init__(self) -> None:
        from fip.inputs import InputAdapter, Normalization

        given = [n for n in ("num_classes", "in_channels", "image_size", "options") if getattr(self, n)]
        if given and self.arch is None:
            raise ConfigError(f"{given[0]} is set but arch is not: pass --arch too (it describes the "
                              "architecture that --arch names)")
        if self.normalize.strip().lower() not in ("auto", "off"):
            Normalization.parse(self.normalize)
        if self.data_shape is not None:
            InputAdapter.parse(self.data_shape)


@dataclass
class Resources:
    """Where and how wide the stages run (Ray Train workers)."""

    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    loader_workers: int | None = None  # DataLoader processes per worker; None: see loader_processes()
    address: str | None = None  # a Ray cluster (ray://host:10001 or auto); None: local Ray started for the job

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {self.threads_per_worker}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise ConfigError(f"loader_workers must be >= 0 (or unset for automatic), got {self.loader_workers}")

    def collective_backend(self) -> str:
        """NCCL when each worker owns at least one GPU; gloo on CPU and for GPU shares below one, since
        NCCL refuses two ranks on one device."""
        return "nccl" if self.gpus_per_worker >= 1 else "gloo"

    def loader_processes(self) -> int:
        """Decoding processes per worker: the setting, or the whole CPUs a worker reserves beyond its own
        torch threads (at most 8), so decoding overlaps compute on a GPU worker with its CPU share, and
        stays in the training process on a 1-CPU worker, where extra processes would only contend."""
        if self.loader_workers is not None:
            return self.loader_workers
        return max(0, min(8, int(self.cpus_per_worker) - self.threads_per_worker))


@dataclass
class RunSettings:
    """Outputs, checkpoints, fault tolerance and evaluation size of one job."""

    work_dir: str = "runs/jobs"
    storage_path: str | None = None  # Ray Train checkpoints; default <work_dir>/ray
    run_name: str | None = None
    checkpoint_every: int = 100
    max_failures: int = 2
    eval_samples: int | None = 2000  # test samples in the periodic evaluations (None: all)
    skip_corrupt: bool = False
    log_every: int = 10
    fail_at_step: int | None = None  # fault injection for tests: the last rank dies here once

    def __post_init__(self) -> None:
        for name in ("checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"eval_samples must be >= 1 (or none for all), got {self.eval_samples}")


@dataclass
class TrackingSettings:
    """MLflow: where runs go, and whether this job logs and registers at all."""

    tracking_uri: str | None = None  # None: sqlite:///<work_dir>/../mlflow.db
    experiment: str = "fip"
    log_to_mlflow: bool = True
    register_as: str | None = "fip-purified"  # None: do not register


@dataclass
class AnalysisSettings:
    """The Hessian spectral density of the suspect and purified models after training (0: skip)."""

    esd_samples: int = 64
    esd_steps: int = 20

    def __post_init__(self) -> None:
        if self.esd_samples < 0 or self.esd_steps < 0:
            raise ConfigError(f"esd_samples and esd_steps must be >= 0, got {self.esd_samples}, {self.esd_steps}")


@dataclass
class AcceptanceSettings:
    """When a purified model is refused instead of registered: judged on D_val only (the defender's clean set),
    against the suspect measured the same way (:mod:`pipeline.acceptance`).

    The default allows a fall of 25 points in D_val accuracy: about three times the largest test-ACC drop of
    any setting the lab's sweeps chose (7.98 points, Blend, docs/tuning.md), while a model wrecked to chance
    level on 10 classes falls by 60 points or more. D_val is what FIP trains on, so its drop is the smaller."""

    max_dval_acc_drop: float = 0.25  # largest fall in D_val accuracy (a fraction) from suspect to purified
    dval_samples: int | None = 2000  # D_val samples both models are measured on (None: all)

    def __post_init__(self) -> None:
        if not 0 <= self.max_dval_acc_drop <= 1:
            raise ConfigError(f"max_dval_acc_drop must be in [0, 1], got {self.max_dval_acc_drop}")
        if self.dval_samples is not None and self.dval_samples < 1:
            raise ConfigError(f"dval_samples must be >= 1 (or none for all), got {self.dval_samples}")


@dataclass
class JobConfig:
    """One purification job; each section is a dataclass, so the whole is typed, nested plain data."""

    inputs: Inputs
    model: ModelSettings = field(default_factory=ModelSettings)
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    resources: Resources = field(default_factory=Resources)
    run: RunSettings = field(default_factory=RunSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    acceptance: AcceptanceSettings = field(default_factory=AcceptanceSettings)

    def __post_init__(self) -> None:
        if self.purify.batch_size % self.resources.workers:
            raise ConfigError(f"global batch {self.purify.batch_size} must be divisible by "
                              f"{self.resources.workers} workers")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobConfig:
        return build(cls, data)

    def replace(self, **sections: dict) -> JobConfig:
        """A copy with some settings changed, e.g. ``cfg.replace(purify={"eta_f": 1e-3})``."""
        return build(JobConfig, merge(self.to_dict(), sections))

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS: dict[str, type] = typing.get_type_hints(JobConfig)


# ---------------------------------------------------------------- strict building from plain data
def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check(value: Any, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: cannot check a setting of type {hint}")


def build(cls: type, data: Any, where: str = ""):
    """``cls(**data)`` with every key known and every value of its declared type (recursively).

    `where` is the dotted path of `data` in the whole config ("" at the top), for the messages."""
    if isinstance(data, cls):
        return data
    what = where or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting {_path(where, unknown[0])!r}; known in {what}: {', '.join(known)}")
    missing = [n for n, f in known.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting {_path(where, missing[0])!r}")
    values = {k: _check(v, hints[k], _path(where, k)) for k, v in data.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}" if where else str(e)) from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what}: {e}") from e


def merge(base: dict, top: dict) -> dict:
    """Deep merge: `top`'s values win, nested mappings merge key by key."""
    out = dict(base)
    for k, v in top.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- presets and files
PRESET_PACKAGE = "pipeline.presets"


def preset_names() -> list[str]:
    folder = importlib_resources.files(PRESET_PACKAGE)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, where: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where} is not valid YAML: {first}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def read_preset(name: str) -> tuple[dict, str]:
    """A preset shipped in the package: its settings and its ``about`` (where its numbers come from)."""
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    text = importlib_resources.files(PRESET_PACKAGE).joinpath(f"{name}.yaml").read_text()
    data = _read_yaml(text, f"preset {name!r}")
    return data, str(data.pop("about", "")).strip()


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    data = _read_yaml(text, str(path))
    data.pop("about", None)
    return data


def load_job_config(preset: str | None = None, files: typing.Sequence[str | Path] = (),
                    overrides: dict | None = None) -> JobConfig:
    """The layered config: dataclass defaults < `preset` < each file in order < `overrides` (flags)."""
    layers: list[tuple[str, dict]] = []
    if preset:
        layers.append((f"preset {preset!r}", read_preset(preset)[0]))
    layers += [(str(f), read_config_file(f)) for f in files]
    layers.append(("flags", overrides or {}))
    merged: dict = {}
    for where, layer in layers:
        unknown = sorted(set(layer) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}; known: {', '.join(SECTIONS)}")
        merged = merge(merged, layer)
    return build(JobConfig, merged)
