"""The `fip` command: help lists the sub-commands; bad input is one line naming the value."""

import json

import pytest

from fipcli.main import main


def test_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("attack", "smoothness", "shard", "purify", "models", "demo"):
        assert cmd in out


def test_attack_command_writes_model_and_record(tmp_path, capsys):
    rc = main(["attack", "--attack", "badnets", "--dataset", "digits", "--width", "0.0625", "--epochs", "1",
               "--clean-fraction", "0.1", "--param", "size=2", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "badnets: ACC" in out
    record = json.loads(next(tmp_path.glob("*.record.json")).read_text())
    for key in ("attack", "params", "target", "poison_rate", "poisoned_index_hash", "seed", "epochs", "acc", "asr", "seconds"):
        assert key in record
    assert record["params"]["size"] == 2 and (tmp_path / record["model_path"].split("/")[-1]).is_file()


def test_bad_input_is_one_line(capsys):
    assert main(["attack", "--attack", "badnets", "--dataset", "digits", "--poison-rate", "2", "--out", "/tmp/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fip attack: error: poison rate must be in (0, 1), got 2.0"
    with pytest.raises(SystemExit) as e:  # the attack names are the parser's own choices
        main(["attack", "--attack", "nope", "--dataset", "digits"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    assert main(["smoothness", "--model", "/nonexistent.safetensors"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_purify_flags_take_their_types_from_the_config():
    import argparse
    from dataclasses import dataclass

    from fipcli.config_flags import add_config_flags, config_overrides

    @dataclass
    class Knobs:
        share: float | None = None
        count: int | None = None
        on: bool = False

    p = argparse.ArgumentParser()
    add_config_flags(p, {"knobs": Knobs})
    args = p.parse_args(["--share", "0.5", "--count", "3", "--on", "yes"])
    assert config_overrides(args, {"knobs": Knobs}) == {"knobs": {"share": 0.5, "count": 3, "on": True}}
    assert config_overrides(p.parse_args(["--count", "none"]), {"knobs": Knobs}) == {"knobs": {"count": None}}
    assert config_overrides(p.parse_args([]), {"knobs": Knobs}) == {}
    with __import__("pytest").raises(SystemExit):
        p.parse_args(["--on", "maybe"])


def test_purify_layers_preset_file_and_flags(tmp_path, capsys):
    import yaml

    (tmp_path / "job.yaml").write_text("inputs: {model: m.safetensors, clean: shards}\npurify: {eta_r: 2.0, iterations: 50}\n")
    rc = main(["purify", "--preset", "demo", "--config", str(tmp_path / "job.yaml"), "--iterations", "7",
               "--register-as", "none", "--print-config"])
    assert rc == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    # flags > file > preset > defaults
    assert cfg["purify"]["iterations"] == 7 and cfg["purify"]["eta_r"] == 2.0 and cfg["purify"]["eta_kl"] == 1.0
    assert cfg["purify"]["eta_f"] == 1e-4 and cfg["tracking"]["register_as"] is None


def test_purify_help_lists_choices_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["purify", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for choices in ("{fip,fast-fip}", "{exact,signed,hutchinson}", "{empirical,true}", "{constant,cosine}"):
        assert choices in out
    assert "--augment BOOL default: True" in out and "--eta-f ETA_F default: 0.0001" in out
    assert "--preset {demo,paper,paper-300}" in out


def test_a_failing_command_leaves_a_ray_it_did_not_start_up(ray_session, tmp_path):
    """`main` shuts down the Ray a command started before its last line (so Ray's teardown chatter comes
    first), but a Ray that was up before, the caller's, stays up: shutting it down made the caller's next
    Ray call end the whole process."""
    import ray

    from fipcli.main import main

    assert main(["evaluate", "--model", str(tmp_path / "missing.safetensors"), "--test", str(tmp_path)]) == 2
    assert ray.is_initialized()
    assert ray.get(ray.put(7)) == 7


def test_models_inspect_reads_a_users_pth_without_unpickling(tmp_path, capsys):
    """`fip models inspect` says what a torchvision-style .pth holds (prefix mapped, the family's normalisation),
    and refuses a whole pickled model in one line."""
    import torch
    from family_models import CLASSES, torchvision_spec

    from fip.models import build_model
    from fipcli.main import main

    model = build_model(torchvision_spec())
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "m.pth")
    assert main(["models", "inspect", str(tmp_path / "m.pth"), "--arch", "torchvision:resnet18",
                 "--num-classes", str(CLASSES), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "architecture: torchvision:resnet18" in out and "keys: all fit" in out
    assert "0.485" in out and "the family's default" in out
    torch.save(model, tmp_path / "whole.pth")
    assert main(["models", "inspect", str(tmp_path / "whole.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "whole pickled model" in err[0]
