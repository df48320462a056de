"""The winner's evidence: the Wilson interval against published values, the probe's verdict in words."""

import pytest

from tuning.evidence import UAP_FLAG, Evidence, wilson_interval, winner_evidence


def test_wilson_interval_matches_published_values():
    # Wilson score intervals at 95 % (z = 1.96), e.g. Newcombe (1998), Table I: 81/263 -> 0.2553-0.3662
    lo, hi = wilson_interval(81, 263)
    assert (lo, hi) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    lo, hi = wilson_interval(15, 148)
    assert (lo, hi) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0


def test_the_verdict_flags_a_class_one_perturbation_still_reaches():
    flagged = winner_evidence({"holdout_acc": 0.88, "uap_max": 0.44, "uap_class": 7}, {"acc": 0.91, "uap_max": 0.83,
                                                                                       "uap_class": 7}, 180)
    assert flagged.flagged and flagged.verdict().startswith("flagged: one small shared perturbation sends 44 %")
    assert "(the suspect: 83 % to class 7)" in flagged.verdict()
    tags = flagged.tags()
    assert tags["evidence.flagged"] == "true" and tags["evidence.uap_class"] == "7"
    lo, hi = (float(v) for v in tags["evidence.holdout_acc_ci95"].strip("[]").split(","))
    assert lo < 0.88 < hi and hi - lo == pytest.approx(0.095, abs=0.01)  # 180 images: about +-5 points
    clean = winner_evidence({"holdout_acc": 0.9, "uap_max": 0.12, "uap_class": 2}, {"acc": 0.91}, 180)
    assert not clean.flagged and clean.verdict().startswith("not flagged")
    unprobed = Evidence(0.9, 180, 0.91)
    assert not unprobed.flagged and unprobed.verdict().startswith("not probed")
    assert "evidence.uap_max" not in unprobed.tags()
    assert 0.14 < UAP_FLAG < 0.71  # between a clean model's probe and the lab's backdoored suspects'
    assert len(flagged.lines()) == 2 and "95 % interval" in flagged.lines()[0]


def test_the_choice_line_says_how_often_the_winner_survives_a_resample():
    steady = winner_evidence({"holdout_acc": 0.9, "uap_max": 0.12, "uap_class": 2}, {"acc": 0.91}, 180,
                             choice_kept=0.87, resamples=200)
    assert steady.lines()[-1] == "choice: this trial still scores highest in 87 % of 200 resamples of the held-out images"
    assert steady.tags()["evidence.choice_kept"] == "0.8700"
    shaky = winner_evidence({"holdout_acc": 0.9}, {"acc": 0.91}, 180, choice_kept=0.31, resamples=200)
    assert shaky.lines()[-1].endswith("(the choice rests on a few of them)")
    assert len(Evidence(0.9, 180, 0.91).lines()) == 2  # a sweep without per-sample records says nothing of it
