"""What a sweep records for an offline study of winner rules (benchmarks.tuned_table.uap_features, study=True):
per-class shares at two radii, and per-image hits that give those shares and the held-out accuracy back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.tuned_table import pack_bits, uap_features, unpack_bits


def test_bits_round_trip():
    bits = torch.rand(3, 13) > 0.5
    assert (unpack_bits(pack_bits(bits), (3, 13)) == bits.numpy()).all()


def test_study_features_give_the_rates_and_the_accuracy_back(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.rand(30, 1, 4, 4), torch.tensor([0] * 6 + [1] * 10 + [2] * 14)
    plain = uap_features(model, x, y)
    assert "uap_hits" not in plain  # only a study pays for the second probe
    found = uap_features(model, x, y, study=True)
    assert found["uap_max"] == plain["uap_max"]
    for name in ("", "_wide"):
        hits = unpack_bits(found[f"uap_hits{name}"], (3, 30))
        for c in range(3):
            assert found[f"uap_rates{name}"][c] == pytest.approx(hits[c].sum() / int((y != c).sum()))
    correct = unpack_bits(found["holdout_hits"], (30,))
    assert correct.mean() == pytest.approx(float((model(x).argmax(1) == y).float().mean()))


def _record(correct: int, hits: dict[int, int], labels: torch.Tensor) -> dict:
    """A model's study record: the first `correct` held-out images right, and for class c the first hits[c]
    images of other classes moved to c (the same at both radii)."""
    n = len(labels)
    grid = torch.zeros(3, n, dtype=torch.bool)
    for c, k in hits.items():
        grid[c, torch.nonzero(labels != c).flatten()[:k]] = True
    right = torch.arange(n) < correct
    return {"holdout_hits": pack_bits(right), "uap_hits": pack_bits(grid), "uap_hits_wide": pack_bits(grid),
            "uap_rates": [float(grid[c].sum()) / int((labels != c).sum()) for c in range(3)]}


def test_rules_read_the_held_out_record_only(tmp_path):
    import json

    from benchmarks import rule_study

    labels = torch.arange(3).repeat(10)  # 30 images, 20 of other classes for each class
    suspect = _record(30, {0: 18}, labels)  # its probe points at class 0
    kept = _record(30, {0: 10}, labels)  # accurate, but half the images still reach class 0
    plain = _record(27, {1: 4}, labels)  # 3 images lost, a little reach of class 1
    natural = _record(29, {2: 8}, labels)  # 1 image lost, class 2 easy to reach, class 0 not at all
    trials = [{**t, "trial": i, "acc": 0.9, "asr": asr, "der": der}
              for i, (t, asr, der) in enumerate(((kept, 0.5, 0.7), (plain, 0.02, 0.9), (natural, 0.01, 0.95)))]
    # a sweep saved with --base-trial: the job's own settings after the 3 drawn trials; fip tune's default would
    # not have run it, so no rule may pick it, however well it scores
    base = {**_record(30, {}, labels), "trial": 3, "acc": 0.92, "asr": 0.0, "der": 1.0}
    row = {"attack": "badnets", "seed": 0, "defense": "fip-tuned", "acc_before": 0.92, "trials": [*trials, base],
           "sweep": {"suspect_uap": suspect, "holdout_labels": labels.tolist()}}
    table = {"attacks": ["badnets"], "meta": {"trials": 3}, "rows": [row]}
    (tmp_path / "defenses-seeded-fashion-mnist.json").write_text(json.dumps(table))
    out = rule_study.main(["--results", str(tmp_path)])
    picks = {name: r["trial"] for name, r in out["sweeps"][0]["rules"].items()}
    # the default weighs the largest share to any class (natural's 0.4 costs more than plain's 3 images);
    # the class-aware rules read the share to the suspect's class, which natural does not reach
    assert picks["der-estimate"] == 1 and picks["suspect-class"] == 2 and picks["safe-then-accurate"] == 2
    assert 0 <= out["main"]["der-estimate"]["kept"] <= 1
    # what the drawn trials offer: plain and natural are under 10 % ASR at 2 points of ACC (the base trial's 0 is
    # not counted)
    assert out["sweeps"][0]["least_drop_under_limit"] == pytest.approx(0.02) and out["sweeps_within_targets"] == 1
    assert (tmp_path / "rule-study-fashion-mnist.md").read_text().startswith("# Winner rules")
    # DER is never read for a choice: other outcomes, the same picks
    for t in trials:
        t["der"], t["asr"] = 0.5, 1.0
    (tmp_path / "defenses-seeded-fashion-mnist.json").write_text(json.dumps(table))
    again = rule_study.main(["--results", str(tmp_path)])
    assert {name: r["trial"] for name, r in again["sweeps"][0]["rules"].items()} == picks
