"""Secrets and code: a purification reading S3 with a sentinel secret in the user's environment writes it
nowhere (Ray's session logs, MLflow's params, tags, store and artifacts, the job's folder, the terminal),
and Ray's workers run the installed package, not a `pipeline/` that happens to be in the current
directory.

Each case runs the tiny job (tiny_job.py) in its own process, ~60 s on 2 loaded cores; `make test` runs the
workers' code case, the secret grep is heavy (`make reliability`, `make test-heavy`).
"""

import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
from reliability.harness import fip_script, run_process
from reliability.tiny_job import purify_argv, quiet_env, tiny_inputs, tracking_uri  # noqa: F401
from secrets_check import files_containing

pytestmark = pytest.mark.slow

SENTINEL = f"sentinel-{uuid.uuid4().hex}"


@pytest.fixture
def ray_tmp():
    """A Ray temp root of the case's own (RAY_TMPDIR), so its session logs are the job's and nobody else's;
    short, since Ray's socket paths live under it."""
    path = Path(tempfile.mkdtemp(prefix="fip-rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.heavy
def test_no_secret_in_any_log(tiny_inputs, s3_store, s3_endpoint, tmp_path, ray_tmp, verdict):  # noqa: F811
    from mlflow import MlflowClient

    from lab.datasets import load_dataset
    from pipeline.shard_writer import write_shards

    model = "s3://fip-test/secrets/suspect.safetensors"
    s3_store.write_bytes(model, Path(tiny_inputs.model).read_bytes())
    s3_store.write_bytes(model.removesuffix(".safetensors") + ".json",
                         Path(tiny_inputs.model).with_suffix(".json").read_bytes())
    clean = "s3://fip-test/secrets/dval"
    write_shards(load_dataset("digits", "train").subset(range(140)), clean, maxcount=70, store=s3_store)
    work = tmp_path / "work"
    work.mkdir()
    argv = purify_argv(tiny_inputs, work, "--model", model, "--clean", clean, "--s3-endpoint", s3_endpoint)
    env = quiet_env(AWS_ACCESS_KEY_ID="AKIASENTINEL", AWS_SECRET_ACCESS_KEY=SENTINEL, AWS_SESSION_TOKEN=SENTINEL,
                    RAY_TMPDIR=str(ray_tmp))
    obs = run_process(argv, work, timeout=400, env=env)
    assert obs.rc == 0, obs.out[-2000:] + obs.err[-3000:]

    sessions = list(ray_tmp.rglob("session_*/logs"))
    assert sessions and any(sessions[0].iterdir()), f"no Ray session logs under {ray_tmp}: the grep would be vacuous"
    client = MlflowClient(tracking_uri(work))
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    found = [f"terminal: {line.strip()[:80]}" for line in (obs.out + obs.err).splitlines() if SENTINEL in line]
    found += [f"MLflow param/tag {k}" for k, v in {**run.data.params, **run.data.tags}.items() if SENTINEL in v]
    found += files_containing(SENTINEL, [ray_tmp, work])  # Ray's session; MLflow's store, artifacts, the job folder
    judged = ("recovered", f"0 occurrences in {sum(1 for _ in ray_tmp.rglob('*'))} files of Ray's session, "
                           f"{sum(1 for _ in work.rglob('*'))} of MLflow's and the job's, the terminal")
    if found:
        judged = ("silent wrong", f"the secret is written in {len(found)} places: {'; '.join(found[:3])}")
    verdict("secret", "recovered", judged, obs.seconds, case="sentinel AWS secret: Ray logs, MLflow, terminal")


def test_workers_run_the_installed_package(tiny_inputs, tmp_path, verdict):  # noqa: F811
    """`fip purify` typed in a folder holding other `pipeline/` and `fip/` packages (another checkout, or
    something planted): the job must run the installed code, in the driver and in every Ray worker."""
    elsewhere = tmp_path / "elsewhere"
    for package in ("pipeline", "fip", "fipcli"):
        (elsewhere / package).mkdir(parents=True)
        (elsewhere / package / "__init__.py").write_text(
            f"raise ImportError('decoy {package} imported from the current directory')\n")
    obs = run_process(purify_argv(tiny_inputs, tmp_path / "work"), elsewhere, timeout=300, env=quiet_env(),
                      command=fip_script())
    text = obs.out + obs.err
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")
    if obs.rc == 0 and "decoy" not in text:
        judged = ("recovered", "the job finished on the installed package; no decoy imported")
    elif "decoy" in text:
        judged = ("silent wrong", f"the current directory's code ran (exit {obs.rc}): {last[:200]}")
    else:
        judged = ("traceback" if "Traceback" in text else "vague error", f"exit {obs.rc}: {last[:200]}")
    verdict("secret", "recovered", judged, obs.seconds, case="workers run the installed package, not the cwd's")
