"""The sweep's live table shows each trial's own figures: the Fisher stage's report (the suspect's figures, so
that Tune has its metric) and unscored checkpoints leave a trial's columns empty (tuning.sweep.LiveTable)."""

import math
from types import SimpleNamespace

from tuning.objective import ObjectiveWeights
from tuning.sweep import LiveTable


def test_a_trial_shows_its_own_figures_only():
    lines: list[str] = []
    table = LiveTable(lines.append, ObjectiveWeights(), every_s=0.0)
    trial = SimpleNamespace(trial_id="t1")
    suspect = {"step": 0, "objective": 0.0, "holdout_acc": 0.9111, "kl_to_suspect": 0.0, "trace_ratio": 1.0}
    table.update(trial, suspect, "RUNNING")
    assert table.rows["t1"] == {"trial": "t1", "status": "RUNNING", "step": 0}
    table.update(trial, {"step": 100, "objective": math.nan}, "RUNNING")  # a checkpoint no scheduler scores
    table.update(trial, suspect, "RUNNING")  # a late report of the Fisher stage does not take the step back
    assert table.rows["t1"] == {"trial": "t1", "status": "RUNNING", "step": 100}
    assert lines[-1].splitlines()[2].split()[:4] == ["t1", "RUNNING", "100", "-"]
    table.update(trial, {"step": 300, "objective": -0.2265, "holdout_acc": 0.8944, "uap_max": 0.2099}, "DONE",
                 force=True)
    assert lines[-1].splitlines()[2].split() == ["t1", "DONE", "300", "-0.2265", "0.8944", "0.2099", "-"]
