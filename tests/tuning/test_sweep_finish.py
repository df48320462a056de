"""A sweep whose trials all failed ends in one line naming the first failure, not in 'winner: none' and exit 0."""

import pytest
import torch

from fipcli.main import user_facing
from pipeline.config import JobConfig
from tuning.objective import Holdout
from tuning.sweep import NoTrialFinished, SweepConfig, _finish


def holdout() -> Holdout:
    return Holdout(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), torch.zeros(2, 2), {"acc": 0.5, "trace": 1.0})


def test_a_sweep_with_no_finished_trial_fails_naming_the_first_error(tmp_path):
    base = JobConfig.from_dict({"inputs": {"model": "m.safetensors", "clean": "dval"},
                                "run": {"work_dir": str(tmp_path)}})
    trials = [{"trial_id": "t1", "status": "ERROR", "p.lr": 0.01,
               "error": "ModelFileError: model file runs/lab/m.safetensors does not exist"},
              {"trial_id": "t2", "status": "STOPPED", "p.lr": 0.02, "objective": -0.5}]
    with pytest.raises(NoTrialFinished) as e:
        _finish(base, SweepConfig(name="s"), trials, None, None, tmp_path, lambda _: None, 0.0, holdout())
    assert str(e.value) == ("sweep s: none of its 2 trials finished (1 failed; trial t1: ModelFileError: model file "
                            f"runs/lab/m.safetensors does not exist); the table is in {tmp_path / 'sweep-table.md'}")
    assert user_facing(e.value) and (tmp_path / "sweep-table.md").is_file()
