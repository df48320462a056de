"""Bad settings, from YAML files and from flags: each is refused in one line naming the setting,
before anything starts (nothing runs, so these are cheap and all run in `make test`)."""

import pytest
from reliability.harness import judge_error, run_main

YAML_CASES = {
    "unknown_key": ("inputs: {model: m, clean: c}\npurify: {etaf: 1}\n", "purify.etaf"),
    "float_for_int": ("inputs: {model: m, clean: c}\npurify: {iterations: 30.5}\n", "purify.iterations"),
    "string_for_bool": ("inputs: {model: m, clean: c}\npurify: {augment: 'no'}\n", "purify.augment"),
    "top_level_list": ("- a\n- b\n", "mapping"),
    "syntax_error": ("inputs: {model: m\n", "YAML"),
    "section_not_a_mapping": ("inputs: {model: m, clean: c}\npurify: 3\n", "purify"),
    "unknown_section": ("purity: {eta_f: 1}\n", "purity"),
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_yaml_config(name, tmp_path, verdict):
    text, names = YAML_CASES[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    obs = run_main(["purify", "--config", str(path), "--print-config"])
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"config file: {name}")


# (command, case) -> (flags, text the error must name); each command is run with the least it needs
# and a flag that prints the resolved settings instead of running
FLAG_CASES = {
    ("purify", "checkpoint_every_0"): (["--checkpoint-every", "0"], "checkpoint_every"),
    ("purify", "eval_every_negative"): (["--eval-every", "-1"], "eval_every"),
    ("purify", "fisher_samples_0"): (["--fisher-samples", "0"], "fisher_samples"),
    ("purify", "augment_pad_negative"): (["--augment-pad", "-2"], "augment_pad"),
    ("purify", "max_failures_negative"): (["--max-failures", "-1"], "max_failures"),
    ("purify", "cpus_per_worker_0"): (["--cpus-per-worker", "0"], "cpus_per_worker"),
    ("purify", "workers_0"): (["--workers", "0"], "workers"),
    ("purify", "augment_maybe"): (["--augment", "maybe"], "--augment"),
    ("purify", "iterations_float"): (["--iterations", "30.5"], "--iterations"),
    ("purify", "unknown_method"): (["--method", "slow-fip"], "--method"),
    ("purify", "negative_eta_r"): (["--eta-r", "-1"], "eta_r"),
    ("tune", "unknown_objective_weight"): (["--objective-weight", "uapp=0.5"], "uapp"),
    ("tune", "objective_weight_not_a_number"): (["--objective-weight", "uap=x"], "uap"),
    ("tune", "negative_objective_weight"): (["--objective-weight", "uap=-1"], "uap"),
    ("tune", "unknown_space_setting"): (["--space", "eta_q=loguniform:1e-5:1e-3"], "eta_q"),
}
PRINT_ONLY = {"purify": "--print-config", "tune": "--print-space"}


@pytest.mark.parametrize("command,name", sorted(FLAG_CASES))
def test_flag(command, name, verdict):
    flags, names = FLAG_CASES[command, name]
    obs = run_main([command, "--model", "m", "--clean", "c", *flags, PRINT_ONLY[command]])
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds,
            case=f"fip {command} {' '.join(flags)}")


def test_tune_objective_weight_reaches_the_sweep():
    import argparse

    from fipcli.tuning_cmds import register, sweep_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["tune", "--model", "m", "--clean", "c", "--objective-weight", "uap=0.5"])
    assert sweep_from_args(args)[1].weights.uap == 0.5
