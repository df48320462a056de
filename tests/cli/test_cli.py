"""The `fip` command: help lists the sub-commands; bad input is one line naming the value."""

import json

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
    assert main(["attack", "--attack", "nope", "--dataset", "digits"]) == 2
    assert "unknown attack 'nope'" in capsys.readouterr().err
    assert main(["smoothness", "--model", "/nonexistent.safetensors"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_purify_flags_take_their_types_from_the_config():
    import argparse
    from dataclasses import dataclass

    from fipcli.pipeline_cmds import add_purify_flags, purify_config_from_args

    @dataclass
    class Knobs:
        share: float | None = None
        count: int | None = None

    p = argparse.ArgumentParser()
    add_purify_flags(p, Knobs)
    args = p.parse_args(["--share", "0.5", "--count", "3"])
    assert args.share == 0.5 and args.count == 3
    p = argparse.ArgumentParser()
    from fip.purify import PurifyConfig

    add_purify_flags(p, PurifyConfig)
    cfg = purify_config_from_args(p.parse_args(["--crop-until", "0.4", "--eta-r", "0.5", "--iterations", "7"]))
    assert (cfg.crop_until, cfg.eta_r, cfg.iterations) == (0.4, 0.5, 7)
