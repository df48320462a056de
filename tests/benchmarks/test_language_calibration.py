"""The language preset's lr rule (benchmarks.language_calibration): the held-out split and the choice."""

import torch

from benchmarks.language_calibration import GRIDS, choose, split_clean_set


def test_split_holds_out_a_share_of_pairs_and_of_text_each():
    x = torch.arange(50)[:, None].repeat(1, 4)  # row i is all i: 40 pairs, then 10 text blocks
    fx, fy, check = split_clean_set(x, x.clone(), n_pairs=40, share=0.25, seed=0)
    pairs, text = check["pairs"][0][:, 0], check["text"][0][:, 0]
    assert len(pairs) == 10 and (pairs < 40).all() and len(text) == 2 and (text >= 40).all()  # round(2.5) = 2
    held = set(pairs.tolist()) | set(text.tolist())
    assert sorted(held | set(fx[:, 0].tolist())) == list(range(50)) and not held & set(fx[:, 0].tolist())
    assert torch.equal(split_clean_set(x, x.clone(), 40, 0.25, 0)[0], fx)  # seeded


def test_choose_takes_the_largest_lr_passing_on_every_suspect():
    big, mid, *_, small = sorted(GRIDS["ft"], reverse=True)
    trials = [{"defence": "ft", "lr": lr, "passes": ok} for lr, ok in
              ((big, True), (big, False), (mid, True), (mid, True), (small, True))]
    assert choose(trials, "ft") == mid
    assert choose([{"defence": "ft", "lr": lr, "passes": False} for lr in GRIDS["ft"]], "ft") == small
