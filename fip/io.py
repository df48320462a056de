"""Safe model I/O: a suspect model is untrusted input, so nothing here ever unpickles freely.

Weights are written as safetensors plus a JSON sidecar (`<stem>.json`) holding the
:class:`~fip.models.ModelSpec` and free-form metadata; the spec is also embedded in the safetensors
header so the file alone suffices. Pickle-based files (`.pt`, `.pth`, `.ckpt`, `.bin`) are read only through
``torch.load(weights_only=True)``, which refuses any object that could run code. A Hugging Face folder
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``) loads as an ``hf:`` model
(:mod:`fip.families`). Keys saved under a wrapper (``module.``, ``model.``, ``_orig_mod.``) are mapped to
the architecture's; keys that still do not fit are named in one line.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fip import families
from fip.inputs import NORMALIZATION_KEY
from fip.models import ModelSpec, build_model, parameter_count, spec_for

SPEC_KEY = "fip.model_spec"
META_KEY = "fip.metadata"
# prefixes that wrappers add to saved keys: DataParallel/DDP, Lightning-style `self.model`, torch.compile
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_SHARD_INDEX = "model.safetensors.index.json"


class ModelFileError(ValueError):
    """A model file is missing, malformed, unsafe, or does not match its architecture."""


@dataclass
class LoadedModel:
    model: nn.Module
    spec: ModelSpec
    metadata: dict = field(default_factory=dict)
    sha256: str = ""


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, spec: ModelSpec, path: str | Path, metadata: dict | None = None) -> Path:
    """Write `model`'s state dict as safetensors with its spec; returns the weights path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelFileError(f"model files are written as .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if k not in tied_copies(model)}  # a tied weight once (safetensors refuses shared tensors)
    meta = dict(metadata or {})
    header = {SPEC_KEY: json.dumps(spec.to_dict()), META_KEY: json.dumps(meta, default=str)}
    tmp = path.with_suffix(".safetensors.tmp")
    save_file(state, str(tmp), metadata=header)
    tmp.replace(path)
    sidecar = {"spec": spec.to_dict(), "metadata": meta, "sha256": file_sha256(path)}
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2, default=str))
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        state = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path} is not a valid safetensors file: {e}") from e
    return state, header


def _read_pickle_weights_only(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True: tensors and plain containers only, never code."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as e:
        if _pickles_a_module(path):
            raise ModelFileError(
                f"refusing {path}: it holds a whole pickled model (torch.save(model)), which only unpickling could "
                "rebuild, and unpickling can run arbitrary code; save torch.save(model.state_dict(), ...) or "
                "safetensors instead") from e
        raise ModelFileError(
            f"refusing {path}: it holds more than plain tensors, and unpickling it fully could run arbitrary code "
            f"(torch.load(weights_only=True) rejected it: {_unpickler_reason(e)}). "
            "Re-save it as a state dict or safetensors from a trusted environment."
        ) from e
    for key in ("state_dict", "model_state_dict", "model"):  # a training checkpoint's model part
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj


def _pickles_a_module(path: Path) -> bool:
    """Whether a torch.save archive pickles an ``nn.Module`` (its state has ``_modules`` and ``_parameters``),
    found by reading the pickle's opcodes without executing any of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if name is None:
                return False
            data = archive.read(name)
        strings = {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except (zipfile.BadZipFile, OSError, ValueError, KeyError):
        return False
    return {"_modules", "_parameters"} <= strings


def _unpickler_reason(error: BaseException) -> str:
    """The specific reason in PyTorch's multi-paragraph refusal (its 'WeightsUnpickler error' part), on one
    line; PyTorch's advice to retry with weights_only=False is deliberately not relayed."""
    text = " ".join(str(error).split())
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Check the documentation|$)", text)
    return (m.group(1) if m else text).strip() or type(error).__name__


def fit_keys(state: dict[str, torch.Tensor], expected: set[str] | list[str]) -> dict[str, torch.Tensor]:
    """`state` with wrapper prefixes (:data:`WRAPPER_PREFIXES`) removed where every key carries one that the
    architecture's keys do not (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile, nested)."""
    expected = set(expected)
    changed = True
    while changed and state:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(k.startswith(prefix) for k in expected):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one Parameter (a language model's input embedding tied to its output head), per group,
    in the model's order."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def tied_copies(model: nn.Module) -> set[str]:
    """The names a file need not hold: every name of a tied group but its first."""
    return {name for names in tie_groups(model) for name in names[1:]}


def fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each tied name the file left out taken from the group's name it holds (as Hugging Face
    and :func:`save_model` write tied weights: once)."""
    out = dict(state)
    for names in tie_groups(model):
        held = next((n for n in names if n in out), None)
        if held is not None:
            for name in names:
                out.setdefault(name, out[held])
    return out


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise in one line naming the missing, unexpected and mis-shaped keys (a few of each, with counts)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing tensor(s) ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) not in the architecture ({_few(unexpected)})")
    if reshaped:
        k = reshaped[0]
        parts.append(f"{len(reshaped)} of another shape (first: {k!r} has shape {tuple(state[k].shape)}, the "
                     f"architecture expects {tuple(expected[k].shape)})")
    raise ModelFileError(f"{source}: the weights do not fit the architecture: " + "; ".join(parts))


def _read_sidecar(path: Path) -> dict:
    """The JSON sidecar beside `path` ({} when there is none), checked to be a mapping with a mapping spec."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file() or sidecar == path:
        return {}
    try:
        side = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"sidecar {sidecar} is not valid JSON: {e}") from e
    if not isinstance(side, dict):
        raise ModelFileError(f"sidecar {sidecar} must be a JSON object, found a {type(side).__name__}")
    for key in ("spec", "metadata"):
        if key in side and not isinstance(side[key], dict):
            raise ModelFileError(f"sidecar {sidecar}: {key!r} must be an object, found a {type(side[key]).__name__}")
    return side


def _spec_from(d, where: str) -> ModelSpec:
    try:
        return ModelSpec.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{where}: {e}") from e


def _header_json(header: dict, key: str, path: Path):
    try:
        return json.loads(header[key])
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: header entry {key!r} is not valid JSON: {e}") from e


@dataclass
class WeightsFile:
    """What a model file holds before anything is built: its tensors, the spec and metadata it records (or the
    caller's spec), where they came from, and its SHA-256."""

    path: Path
    state: dict[str, torch.Tensor]
    spec: ModelSpec | None
    metadata: dict = field(default_factory=dict)
    sha256: str = ""
    format: str = ""


def read_weights(path: str | Path, spec: ModelSpec | None = None) -> WeightsFile:
    """Read a model file or Hugging Face folder without building anything (see :func:`load_model`)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path, spec)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(16)
    side = _read_sidecar(path)
    sidecar = sidecar_path(path)
    side_spec = _spec_from(side["spec"], f"sidecar {sidecar}") if "spec" in side else None
    metadata: dict = dict(side.get("metadata", {}))
    sha256 = file_sha256(path)
    if side.get("sha256") not in (None, sha256):
        raise ModelFileError(f"{path} does not match its sidecar {sidecar}: SHA-256 {sha256[:16]}..., the sidecar "
                             f"records {str(side['sha256'])[:16]}... (changed since it was saved?)")
    is_safetensors = len(head) >= 9 and head[8:9] == b"{"
    if is_safetensors:
        fmt = "safetensors"
        state, header = _read_safetensors(path)
        if SPEC_KEY in header:
            header_spec = _spec_from(_header_json(header, SPEC_KEY, path), f"{path} (header spec)")
            if side_spec is not None and side_spec != header_spec:
                diff = [k for k in header_spec.to_dict() if getattr(header_spec, k) != getattr(side_spec, k)]
                raise ModelFileError(f"sidecar {sidecar} contradicts the spec in {path}'s header: "
                                     + ", ".join(f"{k} {getattr(side_spec, k)!r} vs {getattr(header_spec, k)!r}"
                                                 for k in diff))
            spec = spec or header_spec
        if META_KEY in header:
            meta = _header_json(header, META_KEY, path)
            if not isinstance(meta, dict):
                raise ModelFileError(f"{path}: header entry {META_KEY!r} must be a JSON object")
            metadata = {**meta, **metadata}
    elif path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        fmt = "torch.save state dict (read with weights_only=True)"
        state = _read_pickle_weights_only(path)
    elif head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelFileError(f"{path} is a pickle (torch.save) file, not safetensors: refusing to unpickle it; "
                             "name it .pt to load it with torch.load(weights_only=True), or convert it")
    else:
        raise ModelFileError(f"{path} is neither safetensors nor a .pt/.pth weights file (starts with {head[:8]!r})")
    return WeightsFile(path, state, spec or side_spec, metadata, sha256, fmt)


def _read_hf_folder(folder: Path, spec: ModelSpec | None) -> WeightsFile:
    """A local ``AutoModelForImageClassification`` folder: its spec from ``config.json`` (and the
    normalisation of ``preprocessor_config.json``), its weights from safetensors (one file or shards) or
    ``pytorch_model.bin``."""
    try:
        spec = spec or spec_for(f"hf:{folder}")
    except ValueError as e:
        raise ModelFileError(f"{folder}: {e}") from e
    index = folder / HF_SHARD_INDEX
    if (folder / HF_WEIGHTS[0]).is_file():
        files, fmt = [folder / HF_WEIGHTS[0]], "Hugging Face folder, safetensors"
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFileError(f"{index} is not a safetensors shard index: {e}") from e
        files, fmt = [folder / Path(name).name for name in shards], "Hugging Face folder, safetensors shards"
    elif (folder / HF_WEIGHTS[1]).is_file():
        files, fmt = [folder / HF_WEIGHTS[1]], "Hugging Face folder, pytorch_model.bin (read with weights_only=True)"
    else:
        raise ModelFileError(f"Hugging Face folder {folder} has no weights ({', '.join(HF_WEIGHTS)} or "
                             f"{HF_SHARD_INDEX}); save_pretrained writes them beside config.json")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise ModelFileError(f"{folder}: weights shard {file.name} is missing")
        state.update(_read_safetensors(file)[0] if file.suffix == ".safetensors" else _read_pickle_weights_only(file))
    digest = file_sha256(files[0]) if len(files) == 1 else hashlib.sha256(
        "".join(file_sha256(f) for f in files).encode()).hexdigest()
    return WeightsFile(folder, state, spec, {}, digest, fmt)


def _build(spec: ModelSpec, path: Path) -> nn.Module:
    try:
        return build_model(spec)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from e


def load_model(path: str | Path, spec: ModelSpec | None = None, check_finite: bool = False) -> LoadedModel:
    """Load weights into the stock architecture named by `spec` (or the file's own spec).

    Safetensors files carry their spec; pickle-based files need `spec` (or a JSON sidecar) and are
    read with ``weights_only=True``; a Hugging Face folder brings its own config. The sidecar is untrusted
    too: it must agree with the header's spec and with the file's SHA-256 when it records them. Any mismatch,
    and with `check_finite` a NaN or infinite weight, raises :class:`ModelFileError` in one line.

    A family model (``torchvision:``, ``timm:``, ``hf:``) whose metadata records no ``input_normalization``
    gets its family's default there (:func:`fip.families.default_normalization`); an explicit ``null``
    records a model trained without normalisation.
    """
    weights = read_weights(path, spec)
    path, spec = weights.path, weights.spec
    if spec is None:
        raise ModelFileError(f"{path} carries no model spec: pass the architecture explicitly "
                             "(ours, or torchvision:<builder>, timm:<name>, hf:<folder>)")
    model = _build(spec, path)
    state = fill_tied(model, fit_keys(weights.state, model.state_dict().keys()))
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    model.eval()
    if check_finite:
        try:
            check_finite_weights(model, str(path))
        except ValueError as e:
            raise ModelFileError(str(e)) from e
    metadata = dict(weights.metadata)
    if NORMALIZATION_KEY not in metadata:
        default = families.default_normalization(spec)
        if default is not None:
            metadata[NORMALIZATION_KEY] = default
    return LoadedModel(model=model, spec=spec, metadata=metadata, sha256=weights.sha256)


def describe_model_file(path: str | Path, spec: ModelSpec | None = None) -> str:
    """What was understood from a model file or HF folder, as text (``fip models inspect``): format, spec,
    normalisation and where it comes from, keys and whether they fit, parameter count. Problems are reported
    as lines, not raised, except for a file that cannot be read at all."""
    w = read_weights(path, spec)
    lines = [f"file: {w.path}", f"format: {w.format}", f"sha256: {w.sha256}",
             f"tensors: {len(w.state)} ({sum(t.numel() for t in w.state.values()):,} values)"]
    if w.spec is None:
        sample = ", ".join(list(w.state)[:3])
        lines += ["spec: none recorded; pass the architecture (ours, or torchvision:<builder>, timm:<name>, "
                  f"hf:<folder>) with its classes and image size (first keys: {sample})"]
        return "\n".join(lines)
    s = w.spec
    options = ({"model_type": s.options["config"].get("model_type"), **{k: v for k, v in s.options.items()
                                                                       if k not in ("config",)}}
               if s.source == "hf" else s.options)
    lines += [f"architecture: {s.arch} (source: {s.source})",
              f"classes: {s.num_classes}",
              f"input: {s.in_channels} channel(s), {s.image_size} x {s.image_size}",
              f"options: {json.dumps(options)}"]
    if NORMALIZATION_KEY in w.metadata:
        norm, origin = w.metadata[NORMALIZATION_KEY], "recorded in the file's metadata"
    else:
        norm, origin = families.default_normalization(s), "the family's default"
    lines.append(f"normalisation: {json.dumps(norm)} ({origin})" if norm else
                 "normalisation: none (the model takes [0, 1] inputs as they are)")
    try:
        lines.append(f"parameters: {parameter_count(s):,}")
        model = _build(s, w.path)
        state = fit_keys(w.state, model.state_dict().keys())
        mapped = len(set(state) - set(w.state))
        check_state_dict(model, state, str(w.path))
        lines.append("keys: all fit the architecture" + (f" ({mapped} after removing a wrapper prefix)"
                                                          if mapped else ""))
        bad = [k for k, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        lines.append(f"finite: no, {len(bad)} tensor(s) hold NaN or inf (first {bad[0]})" if bad else "finite: yes")
    except ValueError as e:
        lines.append(f"problem: {e}")
    if w.metadata:
        lines.append(f"metadata keys: {', '.join(sorted(w.metadata))}")
    return "\n".join(lines)


def check_finite_weights(model: nn.Module, source: str = "model") -> None:
    """Raise ValueError when a floating-point weight or buffer holds NaN or inf: every figure computed from
    it would be NaN, and a purification would fail at its first step after a whole Fisher stage."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source}: weights hold NaN or infinite values ({len(bad)} of {len(tensors)} tensors, "
                         f"first {bad[0]})")
