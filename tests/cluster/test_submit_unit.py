"""`fip submit` and `fip jobs` without a cluster: what a job carries (config, code, entrypoint,
runtime_env), what it refuses, and the local stand-in's bookkeeping. No Ray is started here."""

import os
import shlex
import subprocess
import time

import pytest
import yaml

from cluster import local
from cluster.submit import (
    EXCLUDES,
    JOB_YAML,
    SubmitError,
    check_address,
    command_submission,
    purify_submission,
    repo_root,
    stage,
)
from fipcli.main import build_parser, main
from fipcli.pipeline_cmds import job_config_from_args
from pipeline.config import JobConfig

FLAGS = ["--model", "models/suspect.safetensors", "--clean", "s3://bucket/dval", "--iterations", "30",
         "--eta-f", "0.001", "--workers", "2", "--tracking-uri", "http://mlflow.example:5000",
         "--s3-endpoint", "http://s3.example:9000"]


@pytest.fixture(autouse=True)
def _no_cluster_env(monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def test_purify_job_carries_the_config_fip_purify_builds(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["submit", "purify", *FLAGS, "--print-config"]) == 0
    sent = JobConfig.from_dict(yaml.safe_load(capsys.readouterr().out))
    own = job_config_from_args(build_parser().parse_args(["purify", *FLAGS]))
    # the same config, except what running on a cluster needs: the cluster's address, absolute local
    # paths, the run named after the submission
    assert sent.resources.address == "auto" and sent.run.run_name.startswith("fip-purify-")
    assert sent.inputs.model == str(tmp_path / "models/suspect.safetensors")
    assert sent.run.work_dir == str(tmp_path / "runs/jobs")
    expected = own.replace(resources={"address": "auto"}, inputs={"model": sent.inputs.model},
                           run={"work_dir": sent.run.work_dir, "run_name": sent.run.run_name})
    assert sent == expected


def test_submission_entrypoint_and_runtime_env(tmp_path):
    cfg = job_config_from_args(build_parser().parse_args(["purify", *FLAGS]))
    sub, sent = purify_submission(cfg, repo_root(), pip=["einops==0.8.0"], submission_id="fip-purify-test")
    argv = shlex.split(sub.entrypoint)
    assert argv == ["fip", "purify", "--config", JOB_YAML]
    assert build_parser().parse_args(argv[1:]).config == [JOB_YAML]
    env = sub.runtime_env()
    assert env["working_dir"] == str(repo_root()) and env["pip"] == ["einops==0.8.0"]
    assert "env_vars" not in env and {".venv", "runs", ".git", ".cache"} <= set(env["excludes"])
    assert JobConfig.from_dict(yaml.safe_load(sub.files[JOB_YAML])) == sent
    assert sub.submission_id == sent.run.run_name == "fip-purify-test"


def test_staged_working_dir_is_the_code_and_the_job_yaml(tmp_path):
    repo = tmp_path / "repo"
    for rel in ("pyproject.toml", "fip/a.py", "pipeline/presets/p.yaml", ".venv/bin/python", "runs/x.db",
                ".git/HEAD", "fip/__pycache__/a.pyc", ".cache/blob"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(rel)
    cfg = job_config_from_args(build_parser().parse_args(["purify", *FLAGS]))
    sub, _ = purify_submission(cfg, repo)
    out = stage(sub, tmp_path / "stage")
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["fip/a.py", JOB_YAML, "pipeline/presets/p.yaml", "pyproject.toml"]
    assert "runs" in EXCLUDES and not (repo / JOB_YAML).exists()  # the checkout itself is never written


def test_refusals_are_one_line(tmp_path, capsys):
    no_uri = [a for a in FLAGS if a != "--tracking-uri" and a != "http://mlflow.example:5000"]
    assert main(["submit", "purify", *no_uri, "--print-config"]) == 2
    assert "pass --tracking-uri" in capsys.readouterr().err
    assert main(["submit", "purify", *no_uri, "--log-to-mlflow", "false", "--print-config"]) == 0
    capsys.readouterr()
    leaky = [a.replace("http://mlflow", "http://alice:hunter2@mlflow") for a in FLAGS]
    assert main(["submit", "purify", *leaky, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "tracking.tracking_uri holds a URL with a user and password" in err and "hunter2" not in err
    with pytest.raises(SubmitError, match="user and password"):
        command_submission(["models", "list", "--tracking-uri", "https://bob:pw@mlflow:5000"], repo_root())
    assert main(["submit"]) == 2
    assert "nothing to submit" in capsys.readouterr().err
    assert main(["submit", "--address", "127.0.0.1:8265", "--", "models", "list"]) == 2
    assert "http(s)://HOST:PORT" in capsys.readouterr().err
    assert main(["submit", "bench", "no_such_bench"]) == 2
    assert "no benchmark 'no_such_bench'" in capsys.readouterr().err
    with pytest.raises(SubmitError):
        check_address("ray://head:10001")
    for cmd in (["jobs", "--address", f"http://127.0.0.1:{_closed_port()}", "status", "x"],
                ["submit", "--address", f"http://127.0.0.1:{_closed_port()}", "--", "models", "list"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert "cannot reach Ray's jobs API" in err and len(err.splitlines()) == 1


def _closed_port() -> int:
    return local.free_port()


def test_tune_and_bench_pass_their_argv_through(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base.yaml").write_text("purify: {iterations: 50}\n")
    sub = command_submission(["tune", "--config", "base.yaml", "--num-samples", "4"], repo_root(), kind="tune",
                             tracking_uri="http://mlflow:5000")
    argv = shlex.split(sub.entrypoint)
    assert argv[:2] == ["fip", "tune"] and argv[argv.index("--address") + 1] == "auto"
    assert argv[argv.index("--tracking-uri") + 1] == "http://mlflow:5000"
    travelled = argv[argv.index("--config") + 1]
    assert sub.copies[travelled] == tmp_path / "base.yaml"  # the local file goes with the job
    assert stage(sub, tmp_path / "st").joinpath(travelled).read_text() == "purify: {iterations: 50}\n"
    own = command_submission(["tune", "--address", "ray://x:1", "--tracking-uri", "file:///t"], repo_root(),
                             kind="tune", tracking_uri="http://mlflow:5000")
    assert shlex.split(own.entrypoint).count("--address") == 1 and "http://mlflow" not in own.entrypoint
    bench = command_submission(["shard_bench", "--quick"], repo_root(), kind="bench")
    assert shlex.split(bench.entrypoint) == ["python", "-m", "benchmarks.shard_bench", "--quick"]


def test_address_default_comes_from_ray_address(monkeypatch):
    from fipcli.cluster_cmds import DEFAULT_ADDRESS, default_address

    assert default_address() == DEFAULT_ADDRESS
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert default_address() == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # a GCS address is not the jobs API
    assert default_address() == DEFAULT_ADDRESS


def _spawn(tmp_path, script: str) -> local.Service:
    log = tmp_path / "svc.log"
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    time.sleep(0.3)
    return local.Service("svc", proc.pid, local._start_ticks(proc.pid), "http://127.0.0.1:1", str(log))


def test_stopping_a_service_ends_its_whole_session(tmp_path):
    """What a service started (Ray's workers, uvicorn's children) goes with it, even when the
    leader ignores SIGTERM."""
    polite = _spawn(tmp_path, "sleep 300 & sleep 300 & wait")
    stubborn = _spawn(tmp_path, "trap '' TERM; sleep 300 & sleep 300")
    for svc in (polite, stubborn):
        assert len(local._session_members(svc.pid)) >= 2
        local._stop_service(svc, grace=1.0)
        assert local._session_members(svc.pid) == [] and not svc.alive()


def test_local_cluster_bookkeeping(tmp_path, capsys):
    assert local.down(tmp_path, progress=print) is False
    assert "no local cluster recorded" in capsys.readouterr().out
    svc = _spawn(tmp_path, "sleep 300")
    c = local.LocalCluster(str(tmp_path), "http://127.0.0.1:8265", "127.0.0.1:6379", "http://127.0.0.1:5001",
                           "http://127.0.0.1:5002", "/tmp/fip-ray-x", [svc])
    c.save()
    env = dict(line.split("=", 1) for line in c.env_path.read_text().splitlines())
    assert env["RAY_ADDRESS"] == "http://127.0.0.1:8265" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5001"
    assert not any("SECRET" in k or "KEY" in k for k in env)
    assert local.LocalCluster.load(tmp_path).running() == ["svc"]
    with pytest.raises(local.ClusterError, match="already up"):
        local.up(tmp_path, env=os.environ)
    assert local.down(tmp_path, progress=lambda m: None) is True
    assert not c.state_path.exists() and not c.env_path.exists() and not svc.alive()
