"""Safe model I/O: safetensors round trip, clear mismatches, and pickle files that would run code."""

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from fip.io import ModelFileError, load_model, save_model
from fip.models import ModelSpec, build_model


def test_roundtrip_with_sidecar_and_embedded_spec(tmp_path, tiny_spec):
    model = build_model(tiny_spec).eval()
    path = save_model(model, tiny_spec, tmp_path / "m.safetensors", {"note": "hi"})
    assert (tmp_path / "m.json").is_file()
    loaded = load_model(path)
    assert loaded.spec == tiny_spec and loaded.metadata["note"] == "hi" and len(loaded.sha256) == 64
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.model(x), model(x))
    (tmp_path / "m.json").unlink()  # the spec embedded in the header suffices
    assert load_model(path).spec == tiny_spec


def test_mismatched_tensors_name_the_first_bad_key(tmp_path, tiny_spec):
    model = build_model(tiny_spec)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["linear.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelFileError, match=r"'linear.weight' has shape \(3, 3\), the architecture expects \(10, 32\)"):
        load_model(tmp_path / "bad.safetensors", tiny_spec)
    other = ModelSpec("preactresnet18", num_classes=5, in_channels=1, image_size=8, width=0.0625)
    path = save_model(build_model(other), other, tmp_path / "five.safetensors")
    with pytest.raises(ModelFileError, match="linear.weight"):
        load_model(path, tiny_spec)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, tiny_spec):
    marker = tmp_path / "pwned"
    evil = tmp_path / "suspect.pt"
    with open(evil, "wb") as f:
        pickle.dump({"linear.weight": _RunsCode(marker)}, f)
    with pytest.raises(ModelFileError, match="refusing"):
        load_model(evil, tiny_spec)
    assert not marker.exists()
    # a whole pickled module (not a state dict) is refused too
    torch.save(build_model(tiny_spec), tmp_path / "module.pt")
    with pytest.raises(ModelFileError, match="refusing"):
        load_model(tmp_path / "module.pt", tiny_spec)
    # a plain state dict saved with torch.save loads through weights_only
    model = build_model(tiny_spec)
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    assert load_model(tmp_path / "ok.pt", tiny_spec).spec == tiny_spec


def test_files_that_are_not_models(tmp_path, tiny_spec):
    junk = tmp_path / "x.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelFileError, match="not a valid safetensors"):
        load_model(junk, tiny_spec)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.safetensors")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="neither safetensors"):
        load_model(text, tiny_spec)


def test_unknown_architecture_lists_known_names():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'; known: preactresnet18, resnet50"):
        build_model(ModelSpec("resnet9000"))
