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


def test_the_winner_says_how_often_it_survives_a_resample_of_the_held_out_share(tmp_path):
    import numpy as np

    from tuning.stability import SampleRecord

    def record(right: int, moved: int) -> dict:  # 40 held-out images; one probe target
        acc = np.array([1.0] * right + [0.0] * (40 - right))
        hits = np.zeros((1, 40), dtype=bool)
        hits[0, :moved] = True
        return SampleRecord(acc, hits, np.ones((1, 40), dtype=bool)).encode()

    base = JobConfig.from_dict({"inputs": {"model": "m.safetensors", "clean": "dval"},
                                "run": {"work_dir": str(tmp_path)}})
    held = holdout()
    held.suspect, held.suspect_samples = {"acc": 0.95, "trace": 1.0}, record(38, 30)
    features = {"kl_to_suspect": 0.1, "trace_ratio": 1.0, "status": "DONE"}
    trials = [{"trial_id": "a", **features, "objective": -0.1, "holdout_acc": 0.9, "uap_max": 0.05, **record(36, 2)},
              {"trial_id": "b", **features, "objective": -0.4, "holdout_acc": 0.7, "uap_max": 0.15, **record(28, 6)}]
    lines: list[str] = []
    out = _finish(base, SweepConfig(name="s"), trials, None, None, tmp_path, lines.append, 0.0, held)
    assert out.winner["trial_id"] == "a" and out.evidence.choice_kept == 1.0  # 8 images and 10 % of reach apart
    assert lines[-1] == "[fip tune]   choice: this trial still scores highest in 100 % of 200 resamples of the held-out images"
    old = [{k: v for k, v in t.items() if not k.startswith("sample_")} for t in trials]  # resumed from before the records
    assert _finish(base, SweepConfig(name="s"), old, None, None, tmp_path, lines.append, 0.0, held).evidence.choice_kept is None
