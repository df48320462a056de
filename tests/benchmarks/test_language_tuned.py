"""benchmarks.language_tuned: a candidate's row on a tiny suspect, and a choice that reads D_val's objective only."""

import pytest
from text_corpus import tiny_text_lab

from benchmarks.language_tuned import CANDIDATES, choose, trial


def test_fine_tuning_is_fips_loop_without_regularisers():
    ft = [c for c in CANDIDATES if c.defence == "ft-tuned"]
    assert ft and all(c.eta_f == c.eta_r == c.eta_kl == 0.0 and c.name.startswith("ft-") for c in ft)
    assert {c.lr for c in ft} <= {c.lr for c in CANDIDATES if c.defence == "fip-tuned"}  # the same steps


def test_the_choice_reads_the_objective_and_no_true_figure():
    rows = [{"attack": "word", "candidate": c.name, "objective": o} for c, o in zip(CANDIDATES, (-0.5, -0.2, -0.2, -0.9))]
    assert choose(rows)["candidate"] == CANDIDATES[1].name  # the best objective; a tie goes to the earlier setting
    with_truth = [{**r, "asr": 1.0 - i, "der": i} for i, r in enumerate(rows)]
    assert choose(with_truth)["candidate"] == CANDIDATES[1].name  # the true figures change nothing


@pytest.mark.slow
def test_a_candidate_row_on_a_tiny_suspect(tmp_path, one_thread):
    cand = next(c for c in CANDIDATES if c.eta_kl)  # the teacher path runs too
    row = trial("word", cand, str(tmp_path), lab=tiny_text_lab(), iterations=2)
    assert (row["defence"], row["lr"], row["eta_r"], row["eta_kl"]) == ("fip-tuned", cand.lr, cand.eta_r, cand.eta_kl)
    drop = max(0.0, row["suspect_holdout_acc"] - row["holdout_acc"])
    assert row["objective"] == pytest.approx(-drop - row["uap_max"], abs=1e-6)  # the sweep's default objective
    assert 0 <= row["asr"] <= 1 and 0 <= row["der"] <= 1 and row["perplexity"] > 1
    token_drop = max(0.0, row["suspect_holdout_tokens_acc"] - row["holdout_tokens_acc"])
    assert row["objective_token_weighted"] == pytest.approx(-token_drop - row["uap_max"], abs=1e-6)  # the old one
    assert 0 <= row["holdout_pairs_acc"] <= 1
    assert row["uap_max"] == max(row["uap_rates"].values()) >= row["uap_max_no_special"]
    again = trial("word", cand, str(tmp_path), lab=tiny_text_lab(), iterations=2)  # scored again, not purified
    assert again["seconds"] == row["seconds"] and again["objective"] == pytest.approx(row["objective"], abs=1e-6)
