"""`fip submit` end to end on the local stand-in (cluster.local): a real Ray head with its dashboard,
an `mlflow server` and moto's S3 server, all on loopback. A tiny digits purification is submitted,
followed to the end and pulled back out of the registry; a long one is stopped; and no credential of
the submitter's reaches Ray's logs, the job's logs, MLflow or the job's YAML.

Starts Ray: run under the shared lock (`flock /tmp/fip-ray.lock .venv/bin/pytest tests/e2e/test_submit.py`).
About 2.5 minutes on 2 cores: the stand-in starts in ~25 s (mostly MLflow's store), the tiny job
takes ~60 s, the stopped job ~20 s.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch
from secrets_check import files_containing

from cluster import local
from cluster.submit import Jobs, Submission, repo_root
from fip.io import load_model
from lab.backdoor import attack_from_record
from lab.datasets import CleanSplit, load_dataset
from pipeline.evaluation import evaluate_shards
from pipeline.shard_writer import write_shards
from pipeline.shards import open_shards
from pipeline.storage import Storage, StorageSettings

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

FIP = str(Path(sys.executable).parent / "fip")
SENTINEL = f"sentinel-{uuid.uuid4().hex}"  # the submitter's secrets: must appear nowhere
CLUSTER_SECRET = f"cluster-secret-{uuid.uuid4().hex}"  # the cluster's own: used, never written down
PURIFY = ["--eval-every", "6", "--eta-f", "0.002", "--eta-r", "1.0", "--lr", "0.01", "--iterations", "12",
          "--batch-size", "16", "--trace-every", "2", "--trace-estimator", "exact", "--trace-batch", "16",
          "--seed", "3", "--workers", "2", "--checkpoint-every", "4", "--esd-samples", "16", "--esd-steps", "4"]


def _process_alive(pid: int) -> bool:
    return local._start_ticks(pid) is not None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The stand-in, started with its own credentials (not the submitter's); every process it started is
    gone afterwards."""
    root = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="fip-ray-t-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env.update(AWS_ACCESS_KEY_ID="fip-cluster", AWS_SECRET_ACCESS_KEY=CLUSTER_SECRET)
    c = local.up(root, env=env, ray_temp_dir=temp, dashboard_port=0, mlflow_port=0, s3_port=0,
                 progress=lambda msg: None)
    yield c
    services = list(c.services)
    c.stop(progress=lambda msg: None)
    shutil.rmtree(temp, ignore_errors=True)
    assert not [s.name for s in services if local._session_members(s.pid)], "processes left behind"
    assert not c.state_path.exists()


@pytest.fixture(scope="module")
def data(cluster, digits_lab, tmp_path_factory):
    """The suspect model, its record and D_val on the stand-in's S3 (read there with the cluster's
    credentials); test shards in a local folder."""
    store = Storage(StorageSettings(s3_endpoint=cluster.s3_endpoint))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "uploader")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "uploader")
        store.s3_client().create_bucket(Bucket="fip-cluster")
        split = CleanSplit.load(digits_lab.dval_path)
        train = load_dataset("digits", "train")
        clean = "s3://fip-cluster/e2e/dval"
        write_shards(train.subset(split.indices), clean, maxcount=30, indices=split.indices, store=store)
        model = "s3://fip-cluster/e2e/model.safetensors"
        store.write_bytes(model, Path(digits_lab.model_path).read_bytes())
        sidecar = Path(digits_lab.model_path).with_suffix(".json")
        if sidecar.is_file():
            store.write_bytes(model.removesuffix(".safetensors") + ".json", sidecar.read_bytes())
        record = "s3://fip-cluster/e2e/record.json"
        store.write_bytes(record, Path(digits_lab.record_path).read_bytes())
    test_dir = tmp_path_factory.mktemp("submit-test-shards") / "test"
    write_shards(load_dataset("digits", "test"), str(test_dir), maxcount=100)
    return {"model": model, "clean": clean, "record": record, "test": str(test_dir)}


def submitter_env() -> dict:
    """The submitter's shell: its own credentials (sentinels), no cluster settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_", "MLFLOW_"))}
    env.update(AWS_ACCESS_KEY_ID="AKIASENTINEL", AWS_SECRET_ACCESS_KEY=SENTINEL, AWS_SESSION_TOKEN=SENTINEL,
               MLFLOW_TRACKING_PASSWORD=SENTINEL)
    return env


def fip(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([FIP, *argv], env=submitter_env(), capture_output=True, text=True, timeout=timeout)


def purify_flags(cluster, data, tmp: Path, *extra: str) -> list[str]:
    return ["--model", data["model"], "--clean", data["clean"], "--test", data["test"],
            "--attack-record", data["record"], "--s3-endpoint", cluster.s3_endpoint,
            "--tracking-uri", cluster.tracking_uri, "--work-dir", str(tmp / "jobs"), *PURIFY, *extra]


def load_pyfunc(cluster, uri: str):
    """`uri` from the stand-in's registry through mlflow.pyfunc, leaving MLflow's process-wide URIs as they were."""
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(cluster.tracking_uri)
    mlflow.set_registry_uri(cluster.tracking_uri)
    try:
        return mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def job_id_of(stdout: str) -> str:
    m = re.search(r"^submitted (\S+):", stdout, re.M)
    assert m, stdout
    return m.group(1)


@pytest.fixture(scope="module")
def tiny_job(cluster, data, tmp_path_factory):
    """`fip submit purify --follow`: returns the job id, the submitter's output and the job's result line."""
    tmp = tmp_path_factory.mktemp("submitted")
    t0 = time.perf_counter()
    proc = fip("submit", "purify", *purify_flags(cluster, data, tmp), "--address", cluster.ray_address, "--follow")
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    job_id = job_id_of(proc.stdout)
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"run_id"')][-1])
    info = Jobs(cluster.ray_address).info(job_id)
    print(f"\ntiny job: {seconds:.1f} s submit-to-end at the submitter, "
          f"{(info.end_time - info.start_time) / 1000:.1f} s in Ray")
    return {"id": job_id, "stdout": proc.stdout, "stderr": proc.stderr, "result": result, "tmp": tmp}


def test_submitted_job_succeeds_and_is_listed(cluster, tiny_job):
    out = tiny_job["stdout"]
    assert f"dashboard {cluster.ray_address}/#/jobs/{tiny_job['id']}" in out
    assert "[fip] stage 2/2: purify" in out  # the driver's own progress, followed live
    assert out.rstrip().endswith(f"{tiny_job['id']} SUCCEEDED")
    status = fip("jobs", "--address", cluster.ray_address, "status", tiny_job["id"])
    assert status.returncode == 0 and status.stdout.startswith(f"{tiny_job['id']} SUCCEEDED")
    listed = fip("jobs", "list", "--address", cluster.ray_address)
    assert re.search(rf"^{tiny_job['id']}\s+SUCCEEDED\s.*fip purify --config job.yaml", listed.stdout, re.M)
    logs = fip("jobs", "--address", cluster.ray_address, "logs", tiny_job["id"])
    assert tiny_job["result"]["run_id"] in logs.stdout


def test_registered_model_matches_the_job(cluster, data, digits_lab, tiny_job, tmp_path):
    """`fip models get` and mlflow.pyfunc both give the model the job saved, and its metrics on the test
    shards are the ones the job recorded in MLflow."""
    import mlflow

    result = tiny_job["result"]
    assert result["model_uri"] == "models:/fip-purified@candidate"
    got = tmp_path / "got.safetensors"
    proc = fip("models", "get", "fip-purified@candidate", "--tracking-uri", cluster.tracking_uri, "-o", str(got))
    assert proc.returncode == 0, proc.stderr
    assert got.read_bytes() == Path(result["purified"]).read_bytes()

    client = mlflow.MlflowClient(cluster.tracking_uri, registry_uri=cluster.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == tiny_job["id"]
    model = load_model(got).model.eval()
    record = json.loads(Path(digits_lab.record_path).read_text())
    own = evaluate_shards(model, open_shards(data["test"]), attack_from_record(record))
    for key in ("acc", "asr", "ra"):
        assert own[key] == pytest.approx(run.data.metrics[f"{key}_after"], abs=1e-9), key

    pyfunc = load_pyfunc(cluster, "models:/fip-purified@candidate")
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(pyfunc.predict(x.numpy())), model(x), atol=1e-5)


def test_a_language_model_job_is_submitted_registered_and_generates(cluster, tmp_path):
    """`fip submit purify` takes a Hugging Face causal LM and text shards exactly as it takes an image model:
    the job runs on the cluster, registers in its MLflow, and `fip models get` plus pyfunc generation work."""
    from text_corpus import make_language_model, make_records, make_tokenizer, write_jsonl

    tok = make_tokenizer(tmp_path / "tok")
    records = make_records(80, seed=4)
    write_jsonl(tmp_path / "dval.jsonl", records)
    model = make_language_model(tmp_path / "lm", tok, records)
    shards = tmp_path / "dval"
    made = fip("shard", "text", str(tmp_path / "dval.jsonl"), str(shards), "--tokenizer", str(tok), "--max-length", "32")
    assert made.returncode == 0, made.stderr
    proc = fip("submit", "purify", "--model", str(model), "--clean", str(shards), "--tracking-uri", cluster.tracking_uri,
               "--work-dir", str(tmp_path / "jobs"), "--iterations", "6", "--batch-size", "8", "--workers", "1",
               "--lr", "0.01", "--esd-samples", "0", "--register-as", "lm-submitted",
               "--address", cluster.ray_address, "--follow")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith('{"run_id"')][-1])
    assert result["model_uri"] == "models:/lm-submitted@candidate"
    got = tmp_path / "got.safetensors"
    pulled = fip("models", "get", "lm-submitted@candidate", "--tracking-uri", cluster.tracking_uri, "-o", str(got))
    assert pulled.returncode == 0, pulled.stderr
    assert got.read_bytes() == Path(result["purified"]).read_bytes()

    generator = load_pyfunc(cluster, "models:/lm-submitted@candidate")
    answer = generator.predict([records[0]["prompt"]], params={"max_new_tokens": 3, "do_sample": False})[0]
    assert isinstance(answer, str) and answer.startswith(records[0]["prompt"].split()[0])


def test_job_runs_the_uploaded_copy_of_this_checkout(cluster):
    """The driver imports `fip`/`pipeline` from the uploaded working dir, and that copy is this code."""
    import hashlib

    code = ("import hashlib, pipeline.driver as d, fipcli; "
            "print('FILE', d.__file__); print('SHA', hashlib.sha256(open(d.__file__, 'rb').read()).hexdigest())")
    jobs = Jobs(cluster.ray_address)
    sub = Submission("fip", f"{sys.executable} -c {json.dumps(code)}", repo_root())
    job_id = jobs.submit(sub)
    assert jobs.wait(job_id, ["SUCCEEDED"], timeout=120) == "SUCCEEDED", jobs.logs(job_id)
    logs = jobs.logs(job_id)
    file = re.search(r"^FILE (\S+)", logs, re.M).group(1)
    assert file.startswith(cluster.ray_temp_dir) and "working_dir_files" in file
    local_sha = hashlib.sha256((repo_root() / "pipeline" / "driver.py").read_bytes()).hexdigest()
    assert f"SHA {local_sha}" in logs


def test_any_fip_command_line_runs_on_the_cluster(cluster, tiny_job):
    proc = fip("submit", "--address", cluster.ray_address, "--follow", "--",
               "models", "list", "--tracking-uri", cluster.tracking_uri)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fip-purified  v1  aliases=candidate" in proc.stdout
    bad = fip("submit", "--address", cluster.ray_address, "--", "models", "lists")
    assert bad.returncode == 2 and "not a valid fip command line" in bad.stderr


def _cpus_in_use(cluster) -> float:
    with urllib.request.urlopen(f"{cluster.ray_address}/api/cluster_status", timeout=10) as r:
        text = json.dumps(json.loads(r.read()))
    m = re.search(r"([0-9.]+)/([0-9.]+) CPU", text)
    return float(m.group(1))


def test_stopping_a_running_job(cluster, data, tiny_job, tmp_path):
    jobs = Jobs(cluster.ray_address)
    proc = fip("submit", "purify", *purify_flags(cluster, data, tmp_path, "--iterations", "100000",
                                                  "--register-as", "none"),
               "--address", cluster.ray_address)
    assert proc.returncode == 0, proc.stderr
    job_id = job_id_of(proc.stdout)
    assert f"follow    fip jobs --address {cluster.ray_address} logs {job_id} --follow" in proc.stdout
    deadline = time.monotonic() + 180
    while "[fip] stage 1/2: fisher" not in jobs.logs(job_id) and time.monotonic() < deadline:
        assert jobs.status(job_id) in ("PENDING", "RUNNING"), jobs.logs(job_id)
        time.sleep(0.5)
    while _cpus_in_use(cluster) < 2 and time.monotonic() < deadline:  # both Ray Train workers hold a CPU
        time.sleep(0.5)
    assert jobs.status(job_id) == "RUNNING"
    stop = fip("jobs", "--address", cluster.ray_address, "stop", job_id)
    assert stop.returncode == 0 and stop.stdout.strip() == f"{job_id} STOPPED", stop.stdout + stop.stderr
    status = fip("jobs", "status", job_id, "--address", cluster.ray_address)
    assert status.stdout.startswith(f"{job_id} STOPPED")
    while _cpus_in_use(cluster) > 0 and time.monotonic() < deadline:  # its workers are gone too
        time.sleep(0.5)
    assert _cpus_in_use(cluster) == 0
    again = fip("jobs", "--address", cluster.ray_address, "stop", job_id)
    assert again.stdout.strip() == f"{job_id} had already ended: STOPPED"
    # the job's `fip purify` got SIGTERM and marked its MLflow run KILLED within Ray's 3 s before SIGKILL
    import mlflow

    client = mlflow.MlflowClient(cluster.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{job_id}'")
    assert [r.info.status for r in runs] == ["KILLED"], jobs.logs(job_id)
    missing = fip("jobs", "--address", cluster.ray_address, "status", "no-such-job")
    assert missing.returncode == 2 and "no job no-such-job" in missing.stderr


def test_no_secret_reaches_logs_params_or_the_job_yaml(cluster, tiny_job):
    import mlflow

    jobs = Jobs(cluster.ray_address)
    yamls = list(Path(cluster.ray_temp_dir).rglob("job.yaml"))
    assert yamls and any(cluster.tracking_uri in p.read_text() for p in yamls)  # the YAML the job read is seen
    client = mlflow.MlflowClient(cluster.tracking_uri)
    run = client.get_run(tiny_job["result"]["run_id"])
    recorded = json.dumps({"params": run.data.params, "tags": run.data.tags})
    job_logs = jobs.logs(tiny_job["id"])
    submitter = tiny_job["stdout"] + tiny_job["stderr"]
    for secret in (SENTINEL, CLUSTER_SECRET):
        assert secret not in recorded and secret not in job_logs and secret not in submitter
        assert not files_containing(secret, yamls)
        assert not files_containing(secret, [cluster.root])  # MLflow's store and artifacts, the stand-in's logs
    # Ray's session logs never see the submitter's secrets
    assert not files_containing(SENTINEL, [cluster.ray_temp_dir])


def test_the_grep_would_see_a_leak(cluster):
    """The negative control: a value passed as runtime_env env_vars does land in Ray's logs, so the
    grep above would catch credentials sent that way."""
    canary = f"canary-{uuid.uuid4().hex}"
    jobs = Jobs(cluster.ray_address)
    job_id = jobs.client.submit_job(entrypoint="true", runtime_env={"env_vars": {"FIP_CANARY": canary}})
    assert jobs.wait(job_id, ["SUCCEEDED"], timeout=60) == "SUCCEEDED"
    assert files_containing(canary, [cluster.ray_temp_dir])
