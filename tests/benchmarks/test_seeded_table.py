"""The seeded defense table's harness, tiny: one quick suspect, two seeds, two rows (one of them the sweep)."""

from __future__ import annotations

import json

import pytest

from benchmarks import seeded_table


def test_interval_is_students_t():
    mean, low, high = seeded_table.interval([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92)
    assert high - mean == pytest.approx(4.302653 * 0.02 / 3 ** 0.5, rel=1e-5)
    assert seeded_table.interval([0.5]) == (0.5, 0.5, 0.5)


def test_summary_pairs_seeds_and_counts_only_complete_ones(tmp_path):
    rows = [{"attack": a, "seed": s, "defense": d, "acc_before": 0.9, "asr_before": 1.0, "acc": acc, "asr": asr,
             "der": der, "seconds": 1.0}
            for a, asr in (("badnets", 0.02), ("blend", 0.08))
            for s, shift in ((0, 0.0), (1, 0.01), (2, 0.02))
            for d, acc, der in (("ft", 0.85, 0.90 + shift), ("fip-tuned", 0.86, 0.93 + shift))]
    rows.append({**rows[0], "seed": 3})  # seed 3 has one attack only: not in the means
    variant = [{**rows[0], "attack": "blend-v", "seed": s, "der": 0.5 + 0.1 * s} for s in (0, 1, 2)]
    out = seeded_table.summarise(rows + variant, "fashion-mnist", [0, 1, 2, 3], ["badnets", "blend"],
                                 {"results": str(tmp_path)})
    # a variant is reported apart, with its interval over seeds, and never enters the means
    assert out["variants"]["blend-v/ft"]["der"][0] == pytest.approx(0.6)
    assert out["variants"]["blend-v/ft"]["seeds"] == [0, 1, 2] and len(out["rows"]) == len(rows) + 3
    assert "## Variants" in (tmp_path / "defenses-seeded-fashion-mnist.md").read_text()
    assert out["means"]["ft"]["seeds"] == [0, 1, 2]
    assert out["means"]["ft"]["der"][0] == pytest.approx(0.91)
    assert out["means"]["fip-tuned"]["acc_drop"][0] == pytest.approx(0.04)
    assert out["means"]["ft"]["worst_asr"] == ("blend", pytest.approx(0.08))
    diff, low, high = out["paired_with_tuned"]["ft"]
    assert diff == pytest.approx(0.03) and low == pytest.approx(0.03) and high == pytest.approx(0.03)
    assert out["ranked"] == ["fip-tuned", "ft"]


@pytest.mark.heavy  # four cells with two sweeps in two spawned processes: minutes on 2 cores
def test_seeded_table_runs_resumes_and_chooses_without_the_trigger(tmp_path):
    common = ["--attacks", "badnets", "--seeds", "0,1", "--defenses", "ft,fip-tuned", "--quick", "--steps", "2",
              "--trials", "2", "--iterations", "4", "--procs", "2", "--results", str(tmp_path / "results"),
              "--cache", str(tmp_path / "cache"), "--variants", ""]
    out = seeded_table.main(common)
    assert len(out["rows"]) == 4 and {r["seed"] for r in out["rows"]} == {0, 1}
    assert set(out["means"]) == {"ft", "fip-tuned"}
    mean, low, high = out["means"]["ft"]["der"]
    assert low <= mean <= high and out["means"]["ft"]["seeds"] == [0, 1]
    assert "ft" in out["paired_with_tuned"]
    for r in (r for r in out["rows"] if r["defense"] == "fip-tuned"):
        # the sweep's pick is the objective's argmax; DER and ASR are read only for the report
        best = max(r["trials"], key=lambda t: t["objective"])
        assert r["chosen"]["trial"] == best["trial"] and r["der"] == best["der"]
    # the two seeds drew different D_vals: the sweeps' trials differ
    tuned = [r for r in out["rows"] if r["defense"] == "fip-tuned"]
    assert tuned[0]["trials"] != tuned[1]["trials"]
    md = (tmp_path / "results" / "defenses-seeded-fashion-mnist.md").read_text()
    assert md.startswith("# Defenses on fashion-mnist, 2 seeds per cell") and "paired by seed" in md

    again = seeded_table.main([*common, "--resume"])  # nothing left to run: the saved cells are kept as they are
    saved = json.loads((tmp_path / "results" / "defenses-seeded-fashion-mnist.json").read_text())
    assert again["rows"] == saved["rows"] and len(saved["rows"]) == 4


def test_a_sweep_saved_before_the_base_trial_runs_only_that_trial():
    budget = seeded_table.Budget(trials=8, base_trial=True)
    cells = [seeded_table.Cell("blend", 0, d) for d in ("ft", "fip-tuned")]
    old = {"attack": "blend", "seed": 0, "defense": "fip-tuned", "trials": [{}] * 8, "sweep": {"holdout_size": 180}}
    ft = {"attack": "blend", "seed": 0, "defense": "ft"}
    # the default space holds PurifyConfig's own settings: every sweep plans them as a ninth trial
    assert seeded_table.pending(cells, [ft, old], budget) == [(cells[1], old)]
    assert seeded_table.pending(cells, [ft, {**old, "trials": [{}] * 9}], budget) == []
    assert seeded_table.pending(cells, [], budget) == [(cells[0], None), (cells[1], None)]
    # without it (the default, as fip tune's) 8 trials are the plan: the saved sweep is complete
    assert seeded_table.pending(cells, [ft, old], seeded_table.Budget(trials=8)) == []
