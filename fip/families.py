"""Models from other ecosystems, named by source and name: ``torchvision:<builder>``, ``timm:<name>`` and
``hf:<folder>`` (a local ``AutoModelForImageClassification`` folder), beside our own architectures.

A :class:`~fip.models.ModelSpec` whose ``arch`` carries one of these prefixes is checked, counted and built
here; everything else about it (the sidecar, the safetensors header, the meta-device size check) is the
same as for our models, so a purified family model reloads into the user's own architecture. Nothing here
downloads: builders get no pretrained weights, and an HF model is built from its configuration, which the
spec carries (``options["config"]``) so that the weights file alone suffices to rebuild it.

The normalisation a family expects on ``[0, 1]`` inputs (:func:`default_normalization`) is the family's
own default: ImageNet mean/std for torchvision, the model's ``pretrained_cfg`` for timm, the folder's
``preprocessor_config.json`` for HF. docs/families.md lists names, defaults, weight formats and limits.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import sys
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


class ModelSpec(Protocol):
    """What this module reads of a :class:`fip.models.ModelSpec` (which imports this module: the spec
    is described here, not imported)."""

    arch: str
    num_classes: int
    in_channels: int
    image_size: int
    options: dict

SOURCES = ("torchvision", "timm", "hf")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HF_CONFIG, HF_PREPROCESSOR = "config.json", "preprocessor_config.json"
# builder keywords that load weights or files, or that the spec's own fields set (one source of truth)
RESERVED_OPTIONS = frozenset({
    "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir", "weights",
    "weights_backbone", "progress", "num_classes", "in_chans", "img_size", "image_size", "features_only",
})
MAX_OPTION_TEXT = 100_000  # characters of an options mapping as JSON (an HF config is a few KB)


class FamilyError(ValueError):
    """A family model's name, options or folder is unusable; the message is one line."""


def split_arch(arch: str) -> tuple[str | None, str]:
    """``("timm", "vit_tiny_patch16_224")`` for ``"timm:vit_tiny_patch16_224"``; ``(None, arch)`` for ours."""
    source, sep, name = arch.partition(":")
    if not sep:
        return None, arch
    if source not in SOURCES:
        raise FamilyError(f"unknown model source {source!r} in {arch!r}; known sources: {', '.join(SOURCES)}")
    if not name:
        raise FamilyError(f"{arch!r} names no model after {source + ':'!r}")
    return source, name


# ---------------------------------------------------------------- importing the libraries
_TORCHVISION_OPS: list[torch.library.Library] = []  # kept alive: a Library's definitions end with the object


def import_torchvision():
    """``torchvision``, importable beside a CPU-only torch.

    PyPI's torchvision 0.28.0 wheel carries a C extension built for CUDA; beside torch's CPU wheel it does not
    load, and ``torchvision/_meta_registrations.py`` then fails at import time registering fake kernels for
    ``torchvision::nms`` and ``::qnms``, the two ops it registers without checking that they exist. Defining
    those two schemas (without kernels) lets the import finish; classification models never call them, and a
    detection model that did would fail on the missing kernel, not silently. docs/stack-notes.md has the
    finding. Every import of torchvision or timm in the project goes through here."""
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e) and "torchvision::qnms" not in str(e):
            raise
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)
        import torchvision
    return torchvision


def import_timm():
    """``timm``, after :func:`import_torchvision` (timm imports torchvision)."""
    import_torchvision()
    import timm

    return timm


def import_transformers():
    """``transformers``, after :func:`import_torchvision` (its image utilities import torchvision)."""
    import_torchvision()
    import transformers

    return transformers


# ---------------------------------------------------------------- names
@functools.cache
def known_names(source: str) -> tuple[str, ...]:
    """Every model name `source` can build without downloading (classification builders for torchvision)."""
    if source == "torchvision":
        tv = import_torchvision()
        return tuple(tv.models.list_models(module=tv.models))
    if source == "timm":
        return tuple(import_timm().list_models())
    raise FamilyError(f"source {source!r} has no list of names")


def _close(name: str, names: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    return f"close names: {', '.join(close)}" if close else f"{len(names)} names known, none close"


def _check_name(source: str, name: str) -> None:
    if source == "timm":
        base = name.split(".", 1)[0]  # a pretrained tag ("vit_tiny_patch16_224.augreg_in21k") names no weights here
        if not import_timm().is_model(base):
            raise FamilyError(f"timm has no model {name!r}; {_close(base, known_names('timm'))}")
    elif source == "torchvision" and name not in known_names("torchvision"):
        raise FamilyError(f"torchvision has no classification model {name!r}; "
                          f"{_close(name, known_names('torchvision'))}")


# ---------------------------------------------------------------- HF folders
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FamilyError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise FamilyError(f"{path} must hold a JSON object, found a {type(data).__name__}")
    return data


def hf_folder_options(folder: str | Path) -> dict:
    """The spec options of an HF folder: its ``config.json`` and, when present, the normalisation of its
    ``preprocessor_config.json``. The folder must be local; nothing is fetched from the hub."""
    folder = Path(folder)
    if not (folder / HF_CONFIG).is_file():
        raise FamilyError(f"{folder} is not a Hugging Face model folder: no {HF_CONFIG}")
    options: dict[str, Any] = {"config": _read_json(folder / HF_CONFIG)}
    if (folder / HF_PREPROCESSOR).is_file():
        pre = _read_json(folder / HF_PREPROCESSOR)
        if "image_mean" in pre and "image_std" in pre:
            options["preprocessor"] = {"image_mean": pre["image_mean"], "image_std": pre["image_std"]}
    return options


CAUSAL_LM_HEADS = ("ForCausalLM", "LMHeadModel")  # how transformers names causal-LM architectures


def hf_task(config: dict) -> str:
    """The task of an HF config: "causal-lm" where its ``architectures`` name a causal-LM head (GPT-2's
    ``GPT2LMHeadModel``, Llama's ``LlamaForCausalLM``), else "classification"."""
    names = config.get("architectures") or []
    causal = isinstance(names, list) and any(isinstance(n, str) and n.endswith(CAUSAL_LM_HEADS) for n in names)
    return "causal-lm" if causal else "classification"


def spec_task(spec: ModelSpec) -> str:
    """The task of a family spec (fip.tasks names it): only an ``hf:`` folder can be a language model."""
    if split_arch(spec.arch)[0] != "hf":
        return "classification"
    return hf_task(spec.options.get("config") or {})


POSITION_KEYS = ("n_positions", "max_position_embeddings")  # GPT-2's, Llama's


def max_positions(spec: ModelSpec) -> int | None:
    """How many tokens a language model reads at most (its config's positions), None where it does not say."""
    config = spec.options.get("config") or {}
    return next((config[k] for k in POSITION_KEYS if isinstance(config.get(k), int)), None)


def context_length(model: nn.Module) -> int | None:
    """The same for a built model (its ``config`` object): past it, positions have no embedding."""
    config = getattr(model, "config", None)
    return next((getattr(config, k) for k in POSITION_KEYS if isinstance(getattr(config, k, None), int)), None)


def hf_geometry(config: dict) -> dict[str, int]:
    """num_classes / in_channels / image_size as an HF config states them (only those it states); a language
    model's "classes" are its vocabulary."""
    if hf_task(config) == "causal-lm":
        return {"num_classes": config["vocab_size"]} if isinstance(config.get("vocab_size"), int) else {}
    out = {}
    labels = config.get("id2label")
    if isinstance(config.get("num_labels"), int):
        out["num_classes"] = config["num_labels"]
    elif isinstance(labels, dict) and labels:
        out["num_classes"] = len(labels)
    for key, field in (("num_channels", "in_channels"), ("image_size", "image_size")):
        if isinstance(config.get(key), int):
            out[field] = config[key]
    return out


def _hf_config(spec: ModelSpec):
    """The transformers config of an ``hf:`` spec, with the spec's classes and geometry written into it."""
    transformers = import_transformers()
    raw = dict(spec.options.get("config") or {})
    model_type = raw.pop("model_type", None)
    raw.pop("auto_map", None)  # remote code is never run (no trust_remote_code anywhere)
    if not isinstance(model_type, str):
        raise FamilyError(f"{spec.arch}: config.json has no model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError, KeyError) as e:
        raise FamilyError(f"{spec.arch}: transformers cannot read its config.json: {' '.join(str(e).split())}") from e
    if hf_task(spec.options.get("config") or {}) == "causal-lm":
        if getattr(config, "vocab_size", spec.num_classes) != spec.num_classes:
            raise FamilyError(f"{spec.arch}: a language model's classes are its vocabulary ({config.vocab_size} "
                              f"tokens in config.json), not {spec.num_classes}")
        return config
    if config.num_labels != spec.num_classes:
        config.id2label = {i: str(i) for i in range(spec.num_classes)}
        config.label2id = {str(i): i for i in range(spec.num_classes)}
    if hasattr(config, "num_channels"):
        config.num_channels = spec.in_channels
    if hasattr(config, "image_size"):
        config.image_size = spec.image_size
    return config


# ---------------------------------------------------------------- checking and building
def _check_options(spec: ModelSpec, source: str) -> None:
    try:
        text = json.dumps(spec.options, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FamilyError(f"model spec {spec.arch}: options must be plain JSON values ({e})") from e
    if len(text) > MAX_OPTION_TEXT:
        raise FamilyError(f"model spec {spec.arch}: options are {len(text):,} characters of JSON; at most "
                          f"{MAX_OPTION_TEXT:,}")
    if spec.width != 1.0:
        raise FamilyError(f"model spec {spec.arch}: width applies to our own architectures only, got {spec.width:g}")
    if source == "hf":
        unknown = sorted(set(spec.options) - {"config", "preprocessor"})
        if unknown or not isinstance(spec.options.get("config"), dict):
            raise FamilyError(f"model spec {spec.arch}: options must hold the folder's 'config' (and optionally "
                              f"'preprocessor'), got {sorted(spec.options)}")
        return
    reserved = sorted(set(spec.options) & RESERVED_OPTIONS)
    if reserved:
        raise FamilyError(f"model spec {spec.arch}: options {reserved} are not builder options here (weights come "
                          "from the model file; classes and geometry from the spec's own fields)")
    if source == "torchvision" and spec.in_channels != 3:
        raise FamilyError(f"model spec {spec.arch}: torchvision's builders take 3-channel images, spec says "
                          f"in_channels {spec.in_channels} (repeat gray images to 3 channels)")


def check_spec(spec: ModelSpec) -> None:
    """Refuse a family spec whose name, options or geometry cannot be built, in one line."""
    source, name = split_arch(spec.arch)
    if source is None:
        raise FamilyError(f"{spec.arch!r} names no family")
    _check_options(spec, source)
    _check_name(source, name)


def _without_geometry_keyword(builder, kwargs: dict, keyword: str):
    """Build with the input size passed as `keyword`; builders whose model takes no such argument (a ResNet
    adapts to any size) are built without it."""
    try:
        return builder(**kwargs)
    except TypeError as e:
        if keyword not in str(e):
            raise
        return builder(**{k: v for k, v in kwargs.items() if k != keyword})


def _construct(spec: ModelSpec) -> nn.Module:
    source, name = split_arch(spec.arch)
    try:
        if source == "torchvision":
            builder = import_torchvision().models.get_model_builder(name)
            kwargs = {**spec.options, "weights": None, "num_classes": spec.num_classes, "image_size": spec.image_size}
            return _without_geometry_keyword(builder, kwargs, "image_size")
        if source == "timm":
            timm = import_timm()
            kwargs = {**spec.options, "pretrained": False, "num_classes": spec.num_classes,
                      "in_chans": spec.in_channels, "img_size": spec.image_size}
            return _without_geometry_keyword(functools.partial(timm.create_model, name), kwargs, "img_size")
        transformers = import_transformers()
        if spec_task(spec) == "causal-lm":
            return transformers.AutoModelForCausalLM.from_config(_hf_config(spec))
        return transformers.AutoModelForImageClassification.from_config(_hf_config(spec))
    except FamilyError:
        raise
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
        raise FamilyError(f"{spec.arch} cannot be built from this spec: {' '.join(str(e).split())[:300]}") from e


def parameter_count(spec: ModelSpec) -> int:
    """Parameters a family spec would allocate, counted on the meta device."""
    with torch.device("meta"):
        return sum(p.numel() for p in _construct(spec).parameters())


def build(spec: ModelSpec) -> nn.Module:
    """The family model of `spec`, randomly initialised (weights come from the model file), returning logits."""
    model = _construct(spec)
    model.register_forward_hook(logits_only)
    return model


def logits_only(module: nn.Module, args: tuple, output):
    """Forward hook: a model that returns a ``ModelOutput``, a dict or a tuple (HF, torchvision's GoogLeNet in
    training) gives its logits tensor. A hook rather than a wrapper, so parameter names stay the family's."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:  # ModelOutput is a dict
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"{type(module).__name__} returned a {type(output).__name__}, not logits")


def without_logits_hook(module: nn.Module) -> nn.Module:
    """A copy of `module` without :func:`logits_only`: returning its own output type again, as a Hugging Face
    model must for ``generate`` and for its own tools (MLflow's transformers flavour)."""
    plain = copy.deepcopy(module)
    for key, hook in list(plain._forward_hooks.items()):
        if hook is logits_only:
            del plain._forward_hooks[key]
    return plain


# ---------------------------------------------------------------- normalisation
def _per_channel(mean, std, channels: int) -> dict | None:
    """mean/std for `channels` channels: as given, one value repeated, or an RGB default averaged for a gray
    model; None where they cannot match (the caller then states the normalisation)."""
    mean, std = ([float(v)] if isinstance(v, int | float) else [float(t) for t in v] for v in (mean, std))
    if len(mean) != len(std) or not mean:
        return None
    if len(mean) == channels:
        return {"mean": mean, "std": std}
    if len(mean) == 1:
        return {"mean": mean * channels, "std": std * channels}
    if channels == 1:
        return {"mean": [sum(mean) / len(mean)], "std": [sum(std) / len(std)]}
    return None


def default_normalization(spec: ModelSpec) -> dict | None:
    """The family's own input normalisation for `spec` as ``{"mean": [...], "std": [...]}`` on ``[0, 1]``
    inputs (the form of a model's ``input_normalization`` metadata), or None where it has none (ours)."""
    source, name = split_arch(spec.arch)
    if source == "torchvision":
        return _per_channel(IMAGENET_MEAN, IMAGENET_STD, spec.in_channels)
    if source == "timm":
        cfg = import_timm().models.get_pretrained_cfg(name)
        if cfg is None or cfg.mean is None or cfg.std is None:
            return None
        return _per_channel(cfg.mean, cfg.std, spec.in_channels)
    if source == "hf":
        pre = spec.options.get("preprocessor") or {}
        if "image_mean" not in pre:
            return None
        try:
            return _per_channel(pre["image_mean"], pre["image_std"], spec.in_channels)
        except (TypeError, ValueError) as e:
            raise FamilyError(f"{spec.arch}: {HF_PREPROCESSOR} image_mean/image_std are not numbers: {e}") from e
    return None


# ---------------------------------------------------------------- specs from names
def family_defaults(arch: str) -> dict[str, Any]:
    """Classes, geometry and options a family model has when the caller states none: the builder's defaults
    for torchvision and timm (1000 ImageNet classes, the pretrained input size), the config for an HF folder."""
    source, name = split_arch(arch)
    if source == "hf":
        options = hf_folder_options(name)
        return {"in_channels": 3, "image_size": 224, **hf_geometry(options["config"]), "options": options}
    if source == "timm":
        cfg = import_timm().models.get_pretrained_cfg(name)
        size = cfg.input_size[-1] if cfg is not None and cfg.input_size else 224
        return {"num_classes": 1000, "in_channels": 3, "image_size": size}
    if source == "torchvision":
        return {"num_classes": 1000, "in_channels": 3, "image_size": 224}
    return {}
