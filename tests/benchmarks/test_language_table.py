"""The language defence table's core (benchmarks.language_table.defend) on a tiny word suspect, a few steps."""

from dataclasses import replace

import pytest
from text_corpus import tiny_text_lab

from benchmarks.language_table import PRESET, Job, defend

ROW_KEYS = {"attack", "defence", "seconds", "asr_before", "asr", "false_trigger", "false_trigger_near",
            "task_acc_before", "task_acc", "perplexity_before", "perplexity", "next_token_acc", "der", "info"}


@pytest.mark.slow
def test_one_defence_row_on_a_tiny_suspect(tmp_path, one_thread):
    preset = replace(PRESET, iterations=3)
    row = defend(Job("word", "ft", str(tmp_path), preset, lab=tiny_text_lab()))
    assert set(row) == ROW_KEYS and row["attack"] == "word" and row["defence"] == "ft"
    cfg = row["info"]["config"]
    assert cfg == preset.purify_config("ft").to_dict()
    assert (cfg["lr"], cfg["batch_size"], cfg["momentum"], cfg["eta_f"], cfg["eta_r"]) == (
        PRESET.lr, PRESET.batch_size, PRESET.momentum, 0.0, 0.0)
    assert cfg["iterations"] == 3
    assert 0 <= row["asr"] <= 1 and 0 <= row["der"] <= 1 and row["perplexity"] > 1
