"""How much a sweep's choice rests on a few held-out samples (tuning.stability): each model's per-sample record
gives back, on all held-out samples, exactly the accuracy and the probe share the objective read (images and
sequences), survives the trip through a Tune result, and a resampled choice keeps a clear winner and splits a tie."""

import numpy as np
import pytest
import torch
from sum_lm import SumLM
from sum_lm import prompts as _prompts
from torch import nn

from fip.tasks import CAUSAL_LM
from tuning.objective import Holdout, ObjectiveWeights, measure, universal_flip
from tuning.stability import SampleRecord, choice_stability, sample_record
from tuning.text_probe import insertion_flip


def test_an_image_record_gives_the_objectives_features_back(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(30, 1, 4, 4), torch.tensor([0] * 6 + [1] * 10 + [2] * 14)
    holdout = Holdout.from_suspect(model, x, y)
    found = universal_flip(model, x, y, radius=0.8)
    record = sample_record(model, holdout, found)
    every = np.arange(30)
    assert record.features(every)["holdout_acc"] == pytest.approx(measure(model, holdout)["holdout_acc"])
    assert record.features(every)["uap_max"] == pytest.approx(found["uap_max"])
    assert record.rates(every).tolist() == pytest.approx(found["uap_rates"])
    back = SampleRecord.decode(record.encode())  # as a Tune result carries it
    assert (back.hits == record.hits).all() and (back.eligible == record.eligible).all()
    assert back.acc == pytest.approx(record.acc)
    assert sample_record(model, holdout, None).features(every)["uap_max"] == 0.0  # not probed: no targets


def test_a_sequence_record_gives_the_objectives_features_back(one_thread):
    model, (x, y) = SumLM(), _prompts()
    y[:4, -6:] = x[:4, -6:]  # longer responses weigh as one sequence each, as in the objective
    holdout = Holdout.from_suspect(model, x, y, CAUSAL_LM)
    found = insertion_flip(model, x, y, relative=0.6, limit=16)  # the first 16 prompts are probed, not the rest
    record = sample_record(model, holdout, found)
    every = np.arange(len(x))
    assert record.features(every)["holdout_acc"] == pytest.approx(measure(model, holdout)["holdout_acc"])
    assert record.features(every)["uap_max"] == pytest.approx(found["uap_max"])
    assert not record.eligible[:, 16:].any() and record.hits.shape == (len(found["uap_rates"]), len(x))


def _record(acc: list[float], hits: list[int]) -> SampleRecord:
    """A record with per-sample accuracy `acc` and one probe target that moved the samples `hits`."""
    n = len(acc)
    moved = np.zeros((1, n), dtype=bool)
    moved[0, hits] = True
    return SampleRecord(np.array(acc, dtype=float), moved, np.ones((1, n), dtype=bool))


def test_a_clear_winner_survives_resampling_and_a_near_tie_does_not():
    n = 100
    suspect = _record([1.0] * n, list(range(80)))
    features = [{"kl_to_suspect": 0.0, "trace_ratio": 1.0}] * 3
    clear = [_record([1.0] * 95 + [0.0] * 5, [0, 1]), _record([1.0] * 60 + [0.0] * 40, [0, 1]),
             _record([1.0] * 98 + [0.0] * 2, list(range(60)))]
    shares = choice_stability(clear, features, suspect, {"acc": 1.0}, ObjectiveWeights())
    assert shares[0] == 1.0 and sum(shares) == pytest.approx(1.0)
    # two trials that differ on two samples, one each way: each wins about half the resamples
    near = [_record([1.0] * 90 + [0.0] * 10, [0, 1]), _record([1.0] * 89 + [0.0, 1.0] + [0.0] * 9, [0, 1])]
    shares = choice_stability(near, features[:2], suspect, {"acc": 1.0}, ObjectiveWeights())
    assert 0.15 < shares[0] < 0.85 and sum(shares) == pytest.approx(1.0)
