"""`fip attack` as a user meets it: help that lists each attack's knobs, a cache that says when it reuses,
and the D_val file it used."""

import json
import re

import pytest

from fipcli.main import main
from lab.attacks import ATTACKS, BadNets

TINY = ["--dataset", "digits", "--width", "0.0625", "--epochs", "1", "--clean-fraction", "0.1"]


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(["attack", "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _attack(tmp_path, *extra) -> int:
    return main(["attack", "--attack", "badnets", *TINY, "--out", str(tmp_path), *extra])


def _models(folder):
    return sorted(p for p in folder.glob("badnets-*.safetensors") if not p.name.endswith(".trigger.safetensors"))


def test_help_lists_every_attacks_parameters_with_their_defaults(capsys, monkeypatch):
    out = _help(capsys)
    badnets = out[out.index("  badnets "):out.index("  blend ")]
    assert "poison rate 0.1" in badnets and "3 epochs" in badnets
    assert "size=3" in badnets and "position=bottom-right" in badnets and "pattern=white" in badnets
    assert "4 epochs" in out[out.index("  input-aware "):]
    assert "--augment-pad" in out
    for name, cls in ATTACKS.items():
        assert re.search(rf"^  {re.escape(name)} +poison rate {cls.default_poison_rate:g}, {cls.train_epochs} epochs", out, re.M)
        for key in cls.defaults:
            assert f"{key}=" in out, f"{name}'s {key} is missing from the help"
    # generated from the registry, not written by hand
    monkeypatch.setattr(BadNets, "defaults", {**BadNets.defaults, "size": 5})
    monkeypatch.setattr(BadNets, "default_poison_rate", 0.07)
    out = _help(capsys)
    badnets = out[out.index("  badnets "):out.index("  blend ")]
    assert "size=5" in badnets and "poison rate 0.07" in badnets


def test_attack_names_come_from_the_registry(capsys):
    with pytest.raises(SystemExit) as e:
        main(["attack", "--attack", "nope", "--dataset", "digits"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(name in err for name in ATTACKS)


def test_unknown_trigger_parameter_is_one_clear_line(tmp_path, capsys):
    assert _attack(tmp_path, "--param", "colour=1") == 2
    assert capsys.readouterr().err.strip() == (
        "fip attack: error: badnets: unknown parameter(s) ['colour']; known: ['pattern', 'position', 'size']")


def test_different_params_different_models_and_a_rerun_says_it_reuses(tmp_path, capsys):
    assert _attack(tmp_path, "--param", "size=2") == 0
    first = capsys.readouterr().out
    assert "reusing" not in first
    assert _attack(tmp_path, "--param", "size=4", "--param", "pattern=checkerboard") == 0
    assert "reusing" not in capsys.readouterr().out
    assert len(_models(tmp_path)) == 2

    assert _attack(tmp_path, "--param", "size=2") == 0
    out = capsys.readouterr().out
    record = json.loads(next(p for p in tmp_path.glob("*.record.json") if json.loads(p.read_text())["params"]["size"] == 2)
                        .read_text())
    m = re.search(r"^reusing cached model (\S+) \(trained (.+), same config hash (\w+)\); --force retrains$", out, re.M)
    assert m, out
    assert m.group(1) == record["model_path"] and m.group(3) == record["config_hash"]
    assert m.group(2).startswith(record["trained_at"][:10])
    assert len(_models(tmp_path)) == 2

    assert _attack(tmp_path, "--param", "size=2", "--force") == 0
    assert "reusing" not in capsys.readouterr().out


def test_dval_file_is_named_by_its_split_and_shared_across_attack_seeds(tmp_path, capsys):
    assert _attack(tmp_path, "--param", "size=2", "--seed", "0") == 0
    out0 = capsys.readouterr().out
    assert _attack(tmp_path, "--param", "size=2", "--seed", "1") == 0
    out1 = capsys.readouterr().out
    line = next(x for x in out0.splitlines() if x.startswith("D_val:"))
    assert f"{tmp_path}/dval-digits-f0.1-s0.json" in line
    assert "shared by every model with the same split seed and fraction" in line
    assert line in out1.splitlines()  # the other attack seed used the same file
    assert [p.name for p in tmp_path.glob("dval-*.json")] == ["dval-digits-f0.1-s0.json"]
    assert len(_models(tmp_path)) == 2


def test_augment_pad_reaches_the_training_recipe(tmp_path, capsys):
    assert _attack(tmp_path, "--param", "size=2", "--augment-pad", "2") == 0
    capsys.readouterr()
    (model,) = _models(tmp_path)
    assert "-aug2-" in model.name
    record = json.loads(model.with_name(model.name.replace(".safetensors", ".record.json")).read_text())
    assert record["lab_config"]["train"]["augment_pad"] == 2
