"""Family models through the one model seam: names, weights files and HF folders, key prefixes, refusals in one
line, normalisation defaults, round trips through the safetensors sidecar, and what `describe_model_file` says."""

import json
import shutil

import pytest
import torch
from family_models import CLASSES, hf_folder, timm_spec, torchvision_spec
from safetensors.torch import save_file

from fip.families import default_normalization, import_torchvision
from fip.io import NORMALIZATION_KEY, ModelFileError, describe_model_file, load_model, save_model
from fip.models import ModelSpec, build_model, spec_for


def _same_outputs(a, b, size, channels=3):
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def test_unknown_names_get_one_line_with_close_names():
    with pytest.raises(ValueError, match=r"torchvision has no classification model 'resnet181'; close names: .*resnet18"):
        ModelSpec("torchvision:resnet181")
    with pytest.raises(ValueError, match=r"timm has no model 'vit_tiny_patch16_22'; close names: vit_tiny_patch16_224"):
        ModelSpec("timm:vit_tiny_patch16_22")
    with pytest.raises(ValueError, match=r"unknown model source 'keras'"):
        ModelSpec("keras:resnet")
    with pytest.raises(ValueError, match=r"unknown architecture 'preactresnet19'.*close names: preactresnet18"):
        ModelSpec("preactresnet19")
    with pytest.raises(ValueError, match="builders take 3-channel images, spec says in_channels 1"):
        ModelSpec("torchvision:resnet18", in_channels=1)
    with pytest.raises(ValueError, match=r"options \['pretrained'\] are not builder options"):
        ModelSpec("timm:resnet18", options={"pretrained": True})
    with pytest.raises(ValueError, match="width applies to our own architectures only"):
        ModelSpec("timm:resnet18", width=0.5)
    with pytest.raises(ValueError, match="is not a Hugging Face model folder: no config.json"):
        spec_for("hf:/nonexistent/folder")


def test_family_normalisation_defaults():
    assert default_normalization(torchvision_spec()) == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert default_normalization(timm_spec()) == {"mean": [0.5] * 3, "std": [0.5] * 3}  # its pretrained_cfg
    gray = spec_for("timm:resnet18", num_classes=CLASSES, in_channels=1, image_size=16)
    assert default_normalization(gray)["mean"] == [pytest.approx(sum((0.485, 0.456, 0.406)) / 3)]
    assert default_normalization(ModelSpec("preactresnet18")) is None


def test_torchvision_pth_with_a_wrapper_prefix_loads_and_gets_its_normalisation(tmp_path):
    spec = torchvision_spec()
    torch.manual_seed(0)
    model = build_model(spec)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "m.pth")
    loaded = load_model(tmp_path / "m.pth", spec)
    assert _same_outputs(loaded.model, model, spec.image_size)
    assert loaded.metadata[NORMALIZATION_KEY]["std"] == [0.229, 0.224, 0.225]
    # torch.compile's prefix, under DataParallel's, inside a training checkpoint
    torch.save({"state_dict": {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "c.pt")
    assert _same_outputs(load_model(tmp_path / "c.pt", spec).model, model, spec.image_size)


def test_whole_pickled_model_is_refused_with_the_state_dict_advice_and_never_unpickled(tmp_path):
    spec = torchvision_spec()
    torch.save(build_model(spec), tmp_path / "whole.pth")
    with pytest.raises(ModelFileError) as err:
        load_model(tmp_path / "whole.pth", spec)
    assert "refusing" in str(err.value) and "model.state_dict()" in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_of_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    other = build_model(spec_for("torchvision:resnet34", num_classes=CLASSES, image_size=32))
    torch.save(other.state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ModelFileError) as err:
        load_model(tmp_path / "r34.pth", torchvision_spec())
    text = str(err.value)
    assert "unexpected tensor(s) not in the architecture (layer1.2." in text and "more)" in text and "\n" not in text
    vit = build_model(timm_spec())
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ModelFileError, match=r"missing tensor\(s\) \(conv1.weight, bn1.weight, bn1.bias, \.\.\. "):
        load_model(tmp_path / "vit.safetensors", torchvision_spec())
    with pytest.raises(ModelFileError, match="carries no model spec: pass the architecture"):
        load_model(tmp_path / "vit.safetensors")


def test_non_finite_weights_are_refused_in_one_line(tmp_path):
    spec = timm_spec()
    state = {k: v.contiguous().clone() for k, v in build_model(spec).state_dict().items()}
    state["head.bias"][0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    assert load_model(tmp_path / "nan.safetensors", spec).spec == spec  # loading alone does not judge numbers
    with pytest.raises(ModelFileError, match=r"nan.safetensors: weights hold NaN or infinite values \(1 of \d+ tensors, "
                                              r"first head.bias\)"):
        load_model(tmp_path / "nan.safetensors", spec, check_finite=True)


def test_timm_safetensors_round_trips_through_the_sidecar_into_the_users_architecture(tmp_path):
    spec = timm_spec()
    torch.manual_seed(1)
    model = build_model(spec)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "user.safetensors"))
    loaded = load_model(tmp_path / "user.safetensors", spec)
    path = save_model(loaded.model, loaded.spec, tmp_path / "purified.safetensors", loaded.metadata)
    back = load_model(path)  # the file alone: its header carries the family spec
    assert back.spec == spec and type(back.model) is type(model)
    assert back.metadata[NORMALIZATION_KEY] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert _same_outputs(back.model, model, spec.image_size)


def test_hf_folder_loads_and_round_trips_without_the_folder(tmp_path):
    tr_model_folder = hf_folder(tmp_path, "vit")
    loaded = load_model(tr_model_folder)
    assert loaded.spec.source == "hf" and loaded.spec.num_classes == CLASSES and loaded.spec.image_size == 16
    assert loaded.metadata[NORMALIZATION_KEY] == {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    from transformers import AutoModelForImageClassification

    reference = AutoModelForImageClassification.from_pretrained(tr_model_folder, local_files_only=True).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), reference(x).logits, atol=1e-6)  # logits, not a ModelOutput
    path = save_model(loaded.model, loaded.spec, tmp_path / "purified.safetensors", loaded.metadata)
    shutil.rmtree(tr_model_folder)
    back = load_model(path)
    assert back.spec == loaded.spec and _same_outputs(back.model, loaded.model, 16)


def test_hf_folder_without_weights_or_with_a_bin(tmp_path):
    folder = hf_folder(tmp_path, "resnet")
    state = load_model(folder).model.state_dict()
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"hf-resnet has no weights \(model.safetensors, pytorch_model.bin"):
        load_model(folder)
    torch.save(state, folder / "pytorch_model.bin")
    assert load_model(folder).spec.arch == f"hf:{folder}"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": None}))
    with pytest.raises(ModelFileError, match="config.json has no model_type"):
        load_model(folder)


def test_describe_says_what_was_understood(tmp_path):
    spec = torchvision_spec()
    torch.save({f"module.{k}": v for k, v in build_model(spec).state_dict().items()}, tmp_path / "m.pth")
    text = describe_model_file(tmp_path / "m.pth", spec)
    assert "architecture: torchvision:resnet18 (source: torchvision)" in text
    assert "input: 3 channel(s), 32 x 32" in text and f"classes: {CLASSES}" in text
    assert 'normalisation: {"mean": [0.485, 0.456, 0.406]' in text and "(the family's default)" in text
    assert "keys: all fit the architecture (" in text and "after removing a wrapper prefix" in text
    assert "finite: yes" in text and "parameters: 11,178,564" in text
    bare = describe_model_file(tmp_path / "m.pth")
    assert "spec: none recorded" in bare and "module.conv1.weight" in bare
    wrong = describe_model_file(tmp_path / "m.pth", spec_for("torchvision:resnet34", num_classes=CLASSES, image_size=32))
    assert "problem: " in wrong and "missing tensor(s)" in wrong


def test_torchvision_imports_beside_a_cpu_torch():
    tv = import_torchvision()
    assert "resnet18" in tv.models.list_models(module=tv.models)
    assert import_torchvision() is tv
