"""The model section's flags on a command that takes --model: what they build, and one line for each bad input
(before any data is read or Ray started)."""

import json

import pytest
import torch

from fip.models import build_model, spec_for
from fipcli.main import main

RESNET = ("--arch", "torchvision:resnet18", "--num-classes", "10", "--image-size", "16")


@pytest.fixture(scope="module")
def pth(tmp_path_factory):
    """An untrained torchvision resnet18 for 10 classes, saved as its users save it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pth") / "resnet18.pth"
    torch.save(build_model(spec_for("torchvision:resnet18", num_classes=10, image_size=16)).state_dict(), path)
    return path


def test_a_state_dict_with_its_flags_is_evaluated_on_gray_digits(pth, capsys):
    assert main(["evaluate", "--model", str(pth), *RESNET, "--data-shape", "1,8,8", "--test", "digits"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["acc"] <= 1


BAD = {
    "no spec": ((), "carries no model spec"),
    "unknown builder": (("--arch", "torchvision:resnet181"), "close names: resnet18"),
    "numbers without an arch": (("--num-classes", "10"), "num_classes is set but arch is not: pass --arch too"),
    "bad normalisation": ((*RESNET, "--normalize", "0.5"), "expected auto, off, imagenet or MEAN/STD"),
    "bad data shape": ((*RESNET, "--data-shape", "1x8x8"), "expected C,H,W"),
    "another architecture": (("--arch", "timm:test_vit", "--num-classes", "10"), "do not fit the architecture"),
    "data of another geometry": (RESNET, "expects (3, 16, 16) (3 channel(s), 16x16); a model of another input "
                                         "geometry takes them with --data-shape 1,8,8"),
    "classes that disagree": (("--arch", "torchvision:resnet18", "--num-classes", "4"), "do not fit the architecture"),
    "colour data for gray": (("--arch", "torchvision:resnet18", "--num-classes", "10", "--in-channels", "1"),
                             "in_channels"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_flags_get_one_line(pth, case, capsys):
    flags, message = BAD[case]
    assert main(["evaluate", "--model", str(pth), *flags, "--test", "digits"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
