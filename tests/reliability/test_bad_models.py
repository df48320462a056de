"""Bad model files and sidecars: each is refused in one line naming the file (and the field), before any
weight is allocated or any pickle is run. The loader is :func:`fip.io.load_model`, reached here through
`fip smoothness` (a tiny model: an accepted file would run to rc 0, a "silent wrong") and `fip purify`
(refused in the driver's plan, before Ray starts). All in-process and cheap: they run in `make test`."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from reliability.harness import judge_error, run_main
from safetensors.torch import save_file

from fip.io import SPEC_KEY, save_model
from fip.models import ModelSpec, build_model

SPEC = ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_model(build_model(SPEC), SPEC, tmp_path_factory.mktemp("models") / "good.safetensors")


def _with_sidecar(good: Path, dest: Path, sidecar) -> Path:
    """`good`'s weights (spec in the header) beside a hand-made sidecar."""
    dest.write_bytes(good.read_bytes())
    dest.with_suffix(".json").write_text(json.dumps(sidecar))
    return dest


def _headerless(dest: Path, sidecar=None, header: dict | None = None) -> Path:
    """Weights whose header carries no spec (or `header`): the sidecar is the only spec there is."""
    save_file({k: v.contiguous() for k, v in build_model(SPEC).state_dict().items()}, str(dest), metadata=header)
    if sidecar is not None:
        dest.with_suffix(".json").write_text(json.dumps(sidecar))
    return dest


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _case(name: str, good: Path, tmp: Path) -> tuple[Path, tuple[str, ...]]:
    """The bad file for case `name`, and the text the error must contain."""
    spec = SPEC.to_dict()
    side = {"spec": spec, "metadata": {}}
    p = tmp / f"{name}.safetensors"
    if name == "sidecar_is_a_list":
        return _with_sidecar(good, p, [spec]), (f"{name}.json", "list")
    if name == "sidecar_not_json":
        p.write_bytes(good.read_bytes())
        p.with_suffix(".json").write_text("{spec: oops")
        return p, (f"{name}.json", "JSON")
    if name == "num_classes_a_string":
        return _headerless(p, {**side, "spec": {**spec, "num_classes": "10"}}), (f"{name}.json", "num_classes")
    if name == "unknown_options":
        return _headerless(p, {**side, "spec": {**spec, "options": {"depth": 200}}}), (f"{name}.json", "options")
    if name == "num_classes_1e13":
        return _headerless(p, {**side, "spec": {**spec, "num_classes": 1e13}}), (f"{name}.json", "num_classes")
    if name == "width_1e6":
        return _headerless(p, {**side, "spec": {**spec, "width": 1e6}}), (f"{name}.json", "width")
    if name == "header_spec_1e13_classes":
        return _headerless(p, header={SPEC_KEY: json.dumps({**spec, "num_classes": 10**13})}), (name, "num_classes")
    if name == "petabyte_within_field_bounds":
        big = {**spec, "num_classes": 1_000_000, "width": 64}
        return _headerless(p, {**side, "spec": big}), (name, "parameters")
    if name == "sidecar_contradicts_header":
        return _with_sidecar(good, p, {**side, "spec": {**spec, "num_classes": 5}}), (f"{name}.json", "contradicts")
    if name == "sidecar_hash_of_another_file":
        return _with_sidecar(good, p, {**side, "sha256": "0" * 64}), (f"{name}.json", "SHA-256")
    if name == "pickle_renamed_safetensors":
        torch.save(build_model(SPEC).state_dict(), p)
        return p, (name, "pickle")
    if name == "pickle_that_runs_code":
        p = tmp / f"{name}.pt"
        with open(p, "wb") as f:
            pickle.dump({"linear.weight": _RunsCode(tmp / "pwned")}, f)
        p.with_suffix(".json").write_text(json.dumps(side))
        return p, (name, "arbitrary code", "rejected it: Unsupported")
    if name == "not_a_model":
        p.write_text("these are not the weights you are looking for\n" * 20)
        return p, (name, "neither safetensors")
    if name == "missing_file":
        return p, (name, "does not exist")
    raise KeyError(name)


CASES = ["sidecar_is_a_list", "sidecar_not_json", "num_classes_a_string", "unknown_options", "num_classes_1e13",
         "width_1e6", "header_spec_1e13_classes", "petabyte_within_field_bounds", "sidecar_contradicts_header",
         "sidecar_hash_of_another_file", "pickle_renamed_safetensors", "pickle_that_runs_code", "not_a_model",
         "missing_file"]


@pytest.mark.parametrize("name", CASES)
def test_model_file(name, good, tmp_path, verdict):
    path, names = _case(name, good, tmp_path)
    obs = run_main(["smoothness", "--model", str(path), "--dataset", "digits", "--samples", "8", "--iters", "2",
                    "--max-probes", "2", "--density-steps", "0"])
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"model file: {name}")
    assert not (tmp_path / "pwned").exists()  # no pickle ever ran code
    last = obs.err.strip().splitlines()[-1] if obs.err.strip() else ""
    if name == "pickle_that_runs_code":  # the whole refusal, not one cut before its reason
        assert last.rstrip().endswith("safetensors from a trusted environment."), last


@pytest.mark.parametrize("name", ["sidecar_contradicts_header", "num_classes_1e13"])
def test_purify_refuses_the_model_before_ray(name, good, tmp_path, verdict):
    """The job's plan loads the suspect before anything starts: the same line from `fip purify`."""
    path, names = _case(name, good, tmp_path)
    obs = run_main(["purify", "--model", str(path), "--clean", str(tmp_path / "no-shards-needed"),
                    "--work-dir", str(tmp_path / "jobs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"purify model: {name}")
