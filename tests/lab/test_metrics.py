"""ACC / ASR / RA / DER against hand-computed cases."""

import pytest
import torch
from torch import nn

from lab.metrics import (
    attack_success_rate_from_predictions,
    defense_effectiveness_rating,
    evaluate_model,
    robust_accuracy_from_predictions,
)


def test_asr_excludes_target_class_images():
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    targets = torch.zeros(6, dtype=torch.long)
    preds = torch.tensor([0, 0, 0, 0, 3, 1])  # the two class-0 images are not counted
    assert attack_success_rate_from_predictions(preds, labels, targets) == pytest.approx(2 / 4)
    assert robust_accuracy_from_predictions(preds, labels, targets) == pytest.approx(1 / 4)


def test_all_to_all_counts_every_image():
    labels = torch.tensor([0, 1, 2, 9])
    targets = (labels + 1) % 10
    preds = torch.tensor([1, 2, 0, 0])
    assert attack_success_rate_from_predictions(preds, labels, targets) == pytest.approx(3 / 4)


def test_der_hand_computed():
    assert defense_effectiveness_rating(0.92, 1.00, 0.90, 0.02) == pytest.approx((0.98 - 0.02 + 1) / 2)
    assert defense_effectiveness_rating(0.90, 0.50, 0.91, 0.60) == pytest.approx(0.5)  # no credit for gains
    assert defense_effectiveness_rating(0.90, 1.0, 0.10, 0.0) == pytest.approx((1.0 - 0.8 + 1) / 2)


class Fixed(nn.Module):
    """Predicts class 0 when pixel (0,0) is bright, else the label encoded in pixel (0,1)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 10)
        label = (x[:, 0, 0, 1] * 10).round().long()
        out[torch.arange(len(x)), label] = 1
        out[x[:, 0, 0, 0] > 0.5, 0] = 5
        return out


def test_evaluate_model_end_to_end():
    y = torch.tensor([0, 1, 2, 3])
    x = torch.zeros(4, 1, 2, 2)
    x[:, 0, 0, 1] = y.float() / 10
    x[3, 0, 0, 1] = 0.5  # one clean mistake

    def trigger(inp):
        out = inp.clone()
        out[:, 0, 0, 0] = 1
        return out

    m = evaluate_model(Fixed(), x, y, trigger, lambda lab: torch.zeros_like(lab))
    assert m == {"acc": pytest.approx(0.75), "asr": pytest.approx(1.0), "ra": pytest.approx(0.0)}
