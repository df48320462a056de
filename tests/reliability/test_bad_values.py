"""Well-formed files whose numbers are unusable: NaN or infinite weights. Refused in one line before any
work (an analysis would print NaN with exit 0; a purification would fail at step 0 after a whole Fisher
stage). In-process and cheap: they run in `make test`."""

import pytest
import torch
from reliability.harness import judge_error, run_main

from fip.io import save_model
from fip.models import ModelSpec, build_model

SPEC = ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)


@pytest.fixture(params=["nan", "inf"])
def poisoned(request, tmp_path):
    torch.manual_seed(0)
    model = build_model(SPEC)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float(request.param)
    return request.param, save_model(model, SPEC, tmp_path / f"{request.param}.safetensors")


def test_smoothness_refuses_non_finite_weights(poisoned, verdict):
    value, path = poisoned
    obs = run_main(["smoothness", "--model", str(path), "--dataset", "digits", "--samples", "8", "--iters", "2",
                    "--max-probes", "2", "--density-steps", "0"])
    verdict("bad input", "clean error", judge_error(obs, "NaN or infinite"), obs.seconds,
            case=f"fip smoothness: {value} weights")


def test_purify_refuses_non_finite_weights_before_ray(poisoned, tmp_path, verdict):
    value, path = poisoned
    obs = run_main(["purify", "--model", str(path), "--clean", str(tmp_path / "no-shards-needed"),
                    "--work-dir", str(tmp_path / "jobs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    verdict("bad input", "clean error", judge_error(obs, (path.name, "NaN or infinite")), obs.seconds,
            case=f"fip purify: {value} weights")
