"""Safe model I/O: a suspect model is untrusted input, so nothing here ever unpickles freely.

Weights are written as safetensors plus a JSON sidecar (`<stem>.json`) holding the
:class:`~fip.models.ModelSpec` and free-form metadata; the spec is also embedded in the safetensors
header so the file alone suffices. Pickle-based files (`.pt`, `.pth`, `.ckpt`) are read only through
``torch.load(weights_only=True)``, which refuses any object that could run code.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fip.models import ModelSpec, build_model

SPEC_KEY = "fip.model_spec"
META_KEY = "fip.metadata"


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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
        raise ModelFileError(
            f"refusing {path}: it holds more than plain tensors, and unpickling it fully could run arbitrary code "
            f"(torch.load(weights_only=True) rejected it: {_unpickler_reason(e)}). "
            "Re-save it as a state dict or safetensors from a trusted environment."
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _unpickler_reason(error: BaseException) -> str:
    """The specific reason in PyTorch's multi-paragraph refusal (its 'WeightsUnpickler error' part), on one
    line; PyTorch's advice to retry with weights_only=False is deliberately not relayed."""
    text = " ".join(str(error).split())
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Check the documentation|$)", text)
    return (m.group(1) if m else text).strip() or type(error).__name__


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first key whose presence or shape differs from `model`'s."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise ModelFileError(f"{source}: missing tensor {key!r} (expected shape {tuple(ref.shape)})")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ModelFileError(
                f"{source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                f"the architecture expects {tuple(ref.shape)}"
            )
    extra = [k for k in state if k not in expected]
    if extra:
        raise ModelFileError(f"{source}: unexpected tensor {extra[0]!r} not in the architecture")


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


def load_model(path: str | Path, spec: ModelSpec | None = None) -> LoadedModel:
    """Load weights into the stock architecture named by `spec` (or the file's own spec).

    Safetensors files carry their spec; pickle-based files need `spec` (or a JSON sidecar) and are
    read with ``weights_only=True``. The sidecar is untrusted too: it must agree with the header's spec
    and with the file's SHA-256 when it records them. Any mismatch raises :class:`ModelFileError`.
    """
    path = Path(path)
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
        state = _read_pickle_weights_only(path)
    elif head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelFileError(f"{path} is a pickle (torch.save) file, not safetensors: refusing to unpickle it; "
                             "name it .pt to load it with torch.load(weights_only=True), or convert it")
    else:
        raise ModelFileError(f"{path} is neither safetensors nor a .pt/.pth weights file (starts with {head[:8]!r})")
    spec = spec or side_spec
    if spec is None:
        raise ModelFileError(f"{path} carries no model spec: pass the architecture explicitly")
    try:
        model = build_model(spec)
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from e
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    model.eval()
    return LoadedModel(model=model, spec=spec, metadata=metadata, sha256=sha256)


def check_finite_weights(model: nn.Module, source: str = "model") -> None:
    """Raise ValueError when a floating-point weight or buffer holds NaN or inf: every figure computed from
    it would be NaN, and a purification would fail at its first step after a whole Fisher stage."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    bad = [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source}: weights hold NaN or infinite values ({len(bad)} of {len(tensors)} tensors, "
                         f"first {bad[0]})")
