"""Inputs that each look fine but do not belong together (issue 22, classes 3-5), refused in one line by
every command that takes them, before Ray starts:

- model vs shards (classes, channels, image size): one check, :func:`pipeline.validation.check_model_fits`,
  in `fip purify`, `fip evaluate` and `fip tune` (evaluate printed a silently wrong ACC, or a convolution
  traceback; tune died with ``IndexError: Target 7 is out of bounds``);
- an attack record made for another model: :func:`lab.backdoor.check_record_belongs` (evaluate printed
  ASR 0.55 % for a model whose ASR is 100 %); a model without the lab's link only warns, in one line;
- the defender's D_val given as test data: :func:`pipeline.validation.check_clean_is_not_test`.

All in-process on 8x8 digits (a second or two each): they run in `make test`."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability.harness import judge_error, run_main
from reliability.tiny_job import tiny_inputs  # noqa: F401

from fip.io import save_model
from fip.models import ModelSpec, build_model

SPEC = ModelSpec("vit-small", num_classes=10, in_channels=1, image_size=8, width=0.25)


@dataclass(frozen=True)
class Lab:
    five_classes: str  # a 5-class model on the 10-class digits
    rgb_model: str  # a 3-channel model on 1-channel shards
    rgb_test: str  # 3-channel test shards for the 1-channel model
    badnets: str  # a lab-made model (metadata config_hash) and its record
    badnets_record: str
    blend_record: str  # another model's record
    no_link: str  # a model brought by a user: no config_hash


def _record(attack: str, config_hash: str, params: dict) -> dict:
    """The fields of a lab record that the commands read (lab.backdoor.make_backdoored_model writes them)."""
    return {"attack": attack, "params": params, "target": 0, "all_to_all": False, "poison_rate": 0.1, "seed": 0,
            "model_spec": SPEC.to_dict(), "config_hash": config_hash, "trigger_path": None}


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    from lab.datasets import ImageSet, load_dataset
    from pipeline.shard_writer import write_shards

    root = tmp_path_factory.mktemp("mismatch")
    torch.manual_seed(0)
    five = ModelSpec("vit-small", num_classes=5, in_channels=1, image_size=8, width=0.25)
    rgb = ModelSpec("vit-small", num_classes=10, in_channels=3, image_size=8, width=0.25)
    test = load_dataset("digits", "test").subset(range(100))
    write_shards(ImageSet(test.x.repeat(1, 3, 1, 1), test.y, test.classes, "digits-rgb"), str(root / "rgb-test"),
                 maxcount=100)
    badnets = save_model(build_model(SPEC), SPEC, root / "badnets.safetensors",
                         {"attack": "badnets", "config_hash": "badnets0001"})
    (root / "badnets.record.json").write_text(json.dumps(_record("badnets", "badnets0001", {"size": 2})))
    (root / "blend.record.json").write_text(json.dumps(_record("blend", "blend000002", {})))
    return Lab(str(save_model(build_model(five), five, root / "five.safetensors")),
               str(save_model(build_model(rgb), rgb, root / "rgb.safetensors")), str(root / "rgb-test"),
               str(badnets), str(root / "badnets.record.json"), str(root / "blend.record.json"),
               str(save_model(build_model(SPEC), SPEC, root / "user.safetensors")))


def _job(command: str, tmp: Path, model: str, clean: str, *extra: str) -> list[str]:
    """`fip purify` or `fip tune` with the least they need, writing under `tmp`."""
    return [command, "--model", model, "--clean", clean, "--workers", "1", "--batch-size", "16",
            "--work-dir", str(tmp / "jobs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


# ---------------------------------------------------------------- class 3: model vs shards
def _compat(case: str, lab: Lab, inputs) -> tuple[list[str], tuple[str, ...]]:
    if case == "evaluate: 5-class model on 10-class shards":
        return ["evaluate", "--model", lab.five_classes, "--test", inputs.test], ("10 classes", "has 5")
    if case == "evaluate: 5-class model on the digits data set":
        return ["evaluate", "--model", lab.five_classes, "--test", "digits"], ("digits test images", "10 classes", "has 5")
    if case == "evaluate: 1-channel model on 3-channel shards":
        return ["evaluate", "--model", inputs.model, "--test", lab.rgb_test], ("(3, 8, 8)", "(1, 8, 8)")
    if case == "evaluate: 3-channel model on 1-channel shards":
        return ["evaluate", "--model", lab.rgb_model, "--test", inputs.test], ("(1, 8, 8)", "(3, 8, 8)")
    if case == "purify: 1-channel model, 3-channel test shards":
        return (["purify", "--model", inputs.model, "--clean", inputs.clean, "--test", lab.rgb_test],
                ("test shards", "(3, 8, 8)"))
    if case == "tune: 5-class model on 10-class D_val":
        return ["tune", "--model", lab.five_classes, "--clean", inputs.clean], ("clean shards", "10 classes", "has 5")
    if case == "tune: 1-channel model, 3-channel test shards":
        return (["tune", "--model", inputs.model, "--clean", inputs.clean, "--test", lab.rgb_test],
                ("test shards", "(3, 8, 8)"))
    raise AssertionError(case)


COMPAT = ["evaluate: 5-class model on 10-class shards", "evaluate: 5-class model on the digits data set",
          "evaluate: 1-channel model on 3-channel shards",
          "evaluate: 3-channel model on 1-channel shards", "purify: 1-channel model, 3-channel test shards",
          "tune: 5-class model on 10-class D_val", "tune: 1-channel model, 3-channel test shards"]


@pytest.mark.parametrize("case", COMPAT)
def test_model_and_shards_do_not_fit(case, lab, tiny_inputs, tmp_path, monkeypatch, verdict):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    argv, names = _compat(case, lab, tiny_inputs)
    if argv[0] != "evaluate":
        argv = _job(argv[0], tmp_path, argv[2], argv[4], *argv[5:])
    obs = run_main(argv)
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=case)


# ---------------------------------------------------------------- class 4: the attack record's model
@pytest.mark.parametrize("command", ["evaluate", "purify", "tune"])
def test_record_of_another_model(command, lab, tiny_inputs, tmp_path, monkeypatch, verdict):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    if command == "evaluate":
        argv = ["evaluate", "--model", lab.badnets, "--test", tiny_inputs.test, "--attack-record", lab.blend_record]
    else:
        argv = _job(command, tmp_path, lab.badnets, tiny_inputs.clean, "--test", tiny_inputs.test,
                    "--attack-record", lab.blend_record)
    obs = run_main(argv)
    verdict("bad input", "clean error", judge_error(obs, ("badnets0001", "blend000002", Path(lab.blend_record).name)),
            obs.seconds, case=f"fip {command}: the attack record of another model")


def test_record_of_the_model_is_accepted(lab, tiny_inputs):  # noqa: F811
    obs = run_main(["evaluate", "--model", lab.badnets, "--test", tiny_inputs.test, "--attack-record",
                    lab.badnets_record])
    assert obs.rc == 0, obs.err
    assert "warning" not in obs.err and "ASR" in obs.err


def test_model_without_lab_link_warns_in_one_line(lab, tiny_inputs):  # noqa: F811
    obs = run_main(["evaluate", "--model", lab.no_link, "--test", tiny_inputs.test, "--attack-record",
                    lab.badnets_record])
    assert obs.rc == 0, obs.err
    warnings = [line for line in obs.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "config_hash" in warnings[0] and "user.safetensors" in warnings[0], obs.err


# ---------------------------------------------------------------- class 5: D_val given as test data
@pytest.fixture(scope="module")
def copied_dval(tiny_inputs, tmp_path_factory) -> str:  # noqa: F811
    """The same D_val shards under another folder: other URLs, the same SHA-256s."""
    dest = tmp_path_factory.mktemp("copy") / "dval"
    shutil.copytree(tiny_inputs.clean, dest)
    return str(dest)


SAME = {"same folder": lambda clean, copy: clean, "same folder, trailing slash": lambda clean, copy: clean + "/",
        "same folder, its manifest file": lambda clean, copy: f"{clean}/manifest.json",
        "a copy elsewhere": lambda clean, copy: copy}


@pytest.mark.parametrize("command", ["purify", "tune"])
@pytest.mark.parametrize("case", sorted(SAME))
def test_clean_is_test(command, case, tiny_inputs, copied_dval, tmp_path, monkeypatch, verdict):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    test = SAME[case](tiny_inputs.clean, copied_dval)
    obs = run_main(_job(command, tmp_path, tiny_inputs.model, tiny_inputs.clean, "--test", test))
    judged = judge_error(obs, ("clean shards", "test shards", "share"))
    if command == "tune" and (tmp_path / "jobs").exists():
        judged = ("data lost", "the refused sweep wrote its D_val split")
    verdict("bad input", "clean error", judged, obs.seconds, case=f"fip {command} --clean D --test D ({case})")
