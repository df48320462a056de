"""Storage that fails (an S3 endpoint nobody listens on, a missing key or bucket) for each input of
`fip purify` and for `fip shard`'s output: one line naming the URL, before any worker starts. And a job
asking a local Ray for GPUs the machine does not have: refused in one line instead of waiting forever.

The S3 cases run in this process against moto's server on loopback (seconds in all, in `make test`);
the GPU case starts a local Ray in its own process (~15-30 s).
"""

import pytest
from conftest import free_port
from reliability.harness import judge_error, run_main, run_process
from reliability.tiny_job import purify_argv, quiet_env, tiny_inputs  # noqa: F401


@pytest.fixture(scope="module")
def on_s3(tiny_inputs, s3_store) -> dict[str, str]:  # noqa: F811
    """The tiny job's model and D_val on the loopback S3, beside URLs of keys that do not exist."""
    from pathlib import Path

    from lab.datasets import load_dataset
    from pipeline.shard_writer import write_shards

    model = "s3://fip-test/faults/suspect.safetensors"
    s3_store.write_bytes(model, Path(tiny_inputs.model).read_bytes())
    s3_store.write_bytes(model.removesuffix(".safetensors") + ".json",
                         Path(tiny_inputs.model).with_suffix(".json").read_bytes())
    write_shards(load_dataset("digits", "train").subset(range(70)), "s3://fip-test/faults/dval", maxcount=70,
                 store=s3_store)
    return {"model": model, "clean": "s3://fip-test/faults/dval", "missing": "s3://fip-test/faults/missing"}


def _purify(on_s3: dict, endpoint: str, **inputs: str) -> list[str]:
    given = {"model": on_s3["model"], "clean": on_s3["clean"], **inputs}
    argv = ["purify", "--s3-endpoint", endpoint, "--s3-retries", "2", "--s3-retry-delay", "0",
            "--log-to-mlflow", "false", "--workers", "1", "--iterations", "2"]
    for key, url in given.items():
        argv += [f"--{key.replace('_', '-')}", url]
    return argv


INPUT_CASES = {  # the flag, and the URL given for it (relative to the fixtures' keys)
    "--model missing key": ("model", "missing/suspect.safetensors"),
    "--attack-record missing key": ("attack_record", "missing/record.json"),
    "--clean missing prefix": ("clean", "missing/dval"),
    "--test missing prefix": ("test", "missing/test"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_missing_key(case, on_s3, s3_endpoint, tmp_path, monkeypatch, verdict):
    monkeypatch.chdir(tmp_path)  # a refused job must not leave runs/ behind in the repository
    key, rest = INPUT_CASES[case]
    url = f"s3://fip-test/faults/{rest}"
    obs = run_main(_purify(on_s3, s3_endpoint, **{key: url}) + ["--work-dir", str(tmp_path / "jobs")])
    verdict("fault", "clean error", judge_error(obs, url), obs.seconds, case=f"S3 {case}")


@pytest.mark.parametrize("key", ["model", "clean", "attack_record"])
def test_s3_unreachable(key, on_s3, tiny_inputs, tmp_path, monkeypatch, verdict):  # noqa: F811
    """Nothing listens on the endpoint: the one input on S3 fails after its retries, naming its URL."""
    monkeypatch.chdir(tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    url = on_s3.get(key, "s3://fip-test/faults/record.json")
    inputs = {"model": tiny_inputs.model, "clean": tiny_inputs.clean, key: url}
    obs = run_main(_purify(on_s3, dead, **inputs) + ["--work-dir", str(tmp_path / "jobs")])
    verdict("fault", "clean error", judge_error(obs, (url, "could not connect")), obs.seconds,
            case=f"S3 unreachable: --{key.replace('_', '-')}")


@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint"])
def test_shard_output(case, s3_endpoint, tmp_path, verdict):
    endpoint = s3_endpoint if case == "missing bucket" else f"http://127.0.0.1:{free_port()}"
    dest = "s3://fip-no-such-bucket/digits" if case == "missing bucket" else "s3://fip-test/unreachable/digits"
    obs = run_main(["shard", "digits", dest, "--split", "test", "--limit", "50", "--workers", "1",
                    "--s3-endpoint", endpoint, "--s3-retries", "2", "--s3-retry-delay", "0"])
    verdict("fault", "clean error", judge_error(obs, dest.split("/")[2]), obs.seconds,
            case=f"fip shard to S3: {case}")


@pytest.mark.slow
def test_gpus_that_the_machine_does_not_have(tiny_inputs, tmp_path, verdict):  # noqa: F811
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    obs = run_process(purify_argv(tiny_inputs, tmp_path, "--gpus-per-worker", "1"), tmp_path, timeout=150,
                      env=quiet_env())
    verdict("bad input", "clean error", judge_error(obs, ("gpus_per_worker", "GPUs")), obs.seconds,
            case="--gpus-per-worker 1 on a host without GPUs")
