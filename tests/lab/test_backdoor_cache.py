"""The lab's model cache: a file name for every distinct configuration, D_val files named by their split,
and model initialisation seeded without touching the caller's global RNG."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch

from fip.models import ModelSpec, build_model
from lab.attacks import ATTACKS, AttackConfig
from lab.backdoor import (
    NOT_IN_CACHE_KEY,
    LabConfig,
    dval_file_name,
    make_backdoored_model,
    reference_path,
    save_dval,
    seeded_model,
)
from lab.datasets import CleanSplit, DatasetError
from lab.train import TrainConfig


def _cfg(**kw) -> LabConfig:
    attack = kw.pop("attack", AttackConfig("badnets", params={"size": 2}))
    train = kw.pop("train", TrainConfig(epochs=1))
    return LabConfig(attack=attack, dataset="digits", width=0.0625, train=train, clean_fraction=0.1, **kw)


def _changed(value, hint):
    """Another valid value of a config field, to see whether the hash notices."""
    if typing.get_origin(hint) is typing.Literal:
        return next(v for v in typing.get_args(hint) if v != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    raise AssertionError(f"no rule to change {value!r}")


def test_every_model_changing_field_changes_the_hash():
    base = _cfg()
    h = base.config_hash
    variants = {
        "attack.name": _cfg(attack=AttackConfig("blend")),
        "attack.target": _cfg(attack=AttackConfig("badnets", target=7, params={"size": 2})),
        "attack.poison_rate": _cfg(attack=AttackConfig("badnets", poison_rate=0.05, params={"size": 2})),
        "attack.all_to_all": _cfg(attack=AttackConfig("badnets", all_to_all=True, params={"size": 2})),
        "attack.seed": _cfg(attack=AttackConfig("badnets", seed=1, params={"size": 2})),
        "dataset": dataclasses.replace(base, dataset="fashion-mnist"),
        "arch": dataclasses.replace(base, arch="vit-small"),
        "width": dataclasses.replace(base, width=0.125),
        "clean_fraction": dataclasses.replace(base, clean_fraction=0.2),
        "dval_seed": dataclasses.replace(base, dval_seed=1),
        "train_limit": dataclasses.replace(base, train_limit=100),
        "test_limit": dataclasses.replace(base, test_limit=100),  # the record's metrics change
        "image_size": dataclasses.replace(base, image_size=32),
        "arch_options": dataclasses.replace(base, arch_options={"patch_size": 2}),
    }
    # each trigger parameter of badnets, changed from the value in use
    for key, value in {"size": 3, "position": "top-left", "pattern": "checkerboard"}.items():
        variants[f"params.{key}"] = _cfg(attack=AttackConfig("badnets", params={"size": 2, key: value}))
    # every TrainConfig field, found by introspection so a new field cannot be missed
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        train = dataclasses.replace(base.train, **{f.name: _changed(getattr(base.train, f.name), hints[f.name])})
        variants[f"train.{f.name}"] = dataclasses.replace(base, train=train)
    # reference_epochs matters for attacks with a reference model
    lc = _cfg(attack=AttackConfig("lc"))
    variants["reference_epochs (lc)"] = dataclasses.replace(lc, reference_epochs=2)

    for what, cfg in variants.items():
        other = lc.config_hash if what.startswith("reference_epochs") else h
        assert cfg.config_hash != other, f"changing {what} left the config hash unchanged"
    # every LabConfig field is either varied above or deliberately excluded (with a reason)
    covered = {w.split(".")[0].split(" ")[0] for w in variants} | {"attack", "train"}
    assert {f.name for f in dataclasses.fields(LabConfig)} - covered == set(NOT_IN_CACHE_KEY)
    assert all(NOT_IN_CACHE_KEY.values())


def test_settings_that_do_not_change_the_model_keep_the_hash():
    base = _cfg()
    h = base.config_hash
    same = {
        "root": dataclasses.replace(base, root="/somewhere/else"),
        "defaults spelled out": _cfg(attack=AttackConfig("badnets", params={"size": 2, "position": "bottom-right",
                                                                            "pattern": "white"})),
        "default poison rate spelled out": _cfg(attack=AttackConfig("badnets", poison_rate=0.1, params={"size": 2})),
        "reference_epochs (badnets has no reference model)": dataclasses.replace(base, reference_epochs=5),
        "test_limit 0 means none": dataclasses.replace(base, test_limit=0),
    }
    assert dataclasses.replace(base, width=1).config_hash == dataclasses.replace(base, width=1.0).config_hash
    for what, cfg in same.items():
        assert cfg.config_hash == h, f"{what} changed the config hash"
    a2a = [_cfg(attack=AttackConfig("blend", target=t, all_to_all=True)) for t in (0, 3)]
    assert a2a[0].config_hash == a2a[1].config_hash  # the target is unused under all-to-all


def test_names_are_the_readable_stem_plus_the_hash():
    cfg = _cfg()
    assert cfg.name == f"{cfg.stem}-{cfg.config_hash}" and len(cfg.config_hash) == 10
    assert cfg.name.startswith("badnets-digits-preactresnet18-w0.0625-t0-p0.1-s0-")


def test_unknown_parameters_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"badnets: unknown parameter\(s\) \['colour'\]; known: \['pattern', 'position', 'size'\]"):
        make_backdoored_model(_cfg(attack=AttackConfig("badnets", params={"colour": 1})), tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_reference_model_is_keyed_by_its_own_recipe(tmp_path):
    lc = _cfg(attack=AttackConfig("lc"))
    p = reference_path(lc, tmp_path)
    assert reference_path(dataclasses.replace(lc, train=dataclasses.replace(lc.train, lr=0.05)), tmp_path) != p
    assert reference_path(dataclasses.replace(lc, train_limit=50), tmp_path) != p
    assert reference_path(dataclasses.replace(lc, reference_epochs=2), tmp_path) != p
    # the reference model is clean: the poisoning settings do not enter its name
    assert reference_path(_cfg(attack=AttackConfig("lc", poison_rate=0.05, params={"size": 3})), tmp_path) == p


def test_dval_file_is_named_by_its_split():
    assert dval_file_name("digits", 0.1, 0) == "dval-digits-f0.1-s0.json"
    assert _cfg().dval_name == "dval-digits-f0.1-s0.json"
    # the attack seed does not choose D_val: models with different attack seeds share it
    assert _cfg(attack=AttackConfig("badnets", seed=3)).dval_name == _cfg().dval_name
    assert dataclasses.replace(_cfg(), dval_seed=1).dval_name != _cfg().dval_name
    # distinct splits, distinct names (even for fractions a short float format would print alike)
    grid = [(d, f, s) for d in ("digits", "fashion-mnist", "cifar10") for f in (0.01, 0.010000001, 0.1, 0.05, 1e-3)
            for s in (0, 1, 10, 11)]
    assert len({dval_file_name(*g) for g in grid}) == len(grid)


def test_a_different_split_never_replaces_a_dval_file(tmp_path):
    path = tmp_path / dval_file_name("digits", 0.1, 0)
    save_dval(CleanSplit("digits", [1, 2, 3], 0, 1), path)
    save_dval(CleanSplit("digits", [1, 2, 3], 0, 1), path)  # the same split again is fine
    with pytest.raises(DatasetError, match="holds a different D_val"):
        save_dval(CleanSplit("digits", [4, 5, 6], 0, 1), path)
    assert CleanSplit.load(path).indices == [1, 2, 3]


def test_seeded_init_equals_manual_seed_and_leaves_the_global_rng_alone():
    spec = ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = seeded_model(spec, 5)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)  # the old way
    old = build_model(spec).state_dict()
    new = model.state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert not torch.equal(next(iter(seeded_model(spec, 6).state_dict().values())), next(iter(new.values())))


def _model_files(folder):
    return sorted(p.name for p in folder.glob("*.safetensors") if not p.name.endswith(".trigger.safetensors"))


def test_distinct_triggers_get_distinct_files_and_an_identical_run_reuses(tmp_path):
    small = _cfg(attack=AttackConfig("badnets", params={"size": 2}))
    board = _cfg(attack=AttackConfig("badnets", params={"size": 4, "pattern": "checkerboard"}))
    assert small.stem == board.stem  # the old naming scheme gave both one file
    a = make_backdoored_model(small, tmp_path, progress=False)
    b = make_backdoored_model(board, tmp_path, progress=False)
    assert not a.reused and not b.reused
    assert a.model_path != b.model_path and len(_model_files(tmp_path)) == 2
    assert b.record["params"] == {"size": 4, "position": "bottom-right", "pattern": "checkerboard"}
    for art, cfg in ((a, small), (b, board)):
        assert art.config_hash == cfg.config_hash == art.record["config_hash"]
        assert art.model_path.name == f"{cfg.name}.safetensors" and art.record["trained_at"]

    rng = torch.get_rng_state()
    again = make_backdoored_model(_cfg(attack=AttackConfig("badnets", params={"size": 2})), tmp_path, progress=False)
    assert again.reused and again.model_path == a.model_path and again.record == a.record
    assert torch.equal(torch.get_rng_state(), rng)
    forced = make_backdoored_model(small, tmp_path, progress=False, reuse=False)
    assert not forced.reused and forced.record["trained_at"] >= a.record["trained_at"]
    # one D_val file for both: same data set, fraction and split seed
    assert a.dval_path == b.dval_path and a.dval_path.name == "dval-digits-f0.1-s0.json"
    assert json.loads(a.dval_path.read_text())["sha256_16"] == a.record["dval_sha256_16"]


def test_a_record_with_another_hash_is_not_reused(tmp_path):
    cfg = _cfg()
    first = make_backdoored_model(cfg, tmp_path, progress=False)
    record = json.loads(first.record_path.read_text())
    record["config_hash"] = "0000000000"
    first.record_path.write_text(json.dumps(record))
    assert not make_backdoored_model(cfg, tmp_path, progress=False).reused


def test_training_leaves_the_callers_global_rng_alone(tmp_path):
    torch.manual_seed(99)
    before = torch.get_rng_state()
    make_backdoored_model(_cfg(attack=AttackConfig("input-aware")), tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


def test_every_attack_hashes():
    hashes = {_cfg(attack=AttackConfig(name)).config_hash for name in ATTACKS}
    assert len(hashes) == len(ATTACKS)


def test_a_moved_cache_is_reused_and_its_records_find_their_files(tmp_path):
    """Records name their files by absolute path; a cache committed or cloned elsewhere (benchmarks/suspects)
    is still reused, and its learned trigger found beside the record."""
    from lab.backdoor import attack_from_record

    cfg = _cfg(attack=AttackConfig("input-aware"))
    first = make_backdoored_model(cfg, tmp_path / "here", progress=False)
    assert first.record["trigger_path"]
    (tmp_path / "here").rename(tmp_path / "there")
    moved = make_backdoored_model(cfg, tmp_path / "there", progress=False)
    assert moved.reused and moved.dval_path == tmp_path / "there" / first.dval_path.name
    for key in ("model_path", "trigger_path", "dval_path"):
        assert moved.record[key] == str(tmp_path / "there" / Path(first.record[key]).name)
    from safetensors.torch import load_file

    trigger = attack_from_record(moved.record_path).state_tensors()  # raised before: no file at the old path
    saved = load_file(tmp_path / "there" / Path(first.record["trigger_path"]).name)
    assert trigger and trigger.keys() == saved.keys() and all(torch.equal(trigger[k], saved[k]) for k in saved)
