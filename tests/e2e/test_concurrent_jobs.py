"""Two jobs at once in one Python process, each with its own S3 endpoint and MLflow store, and a stage
added to the driver by one line: nothing the jobs need is process-wide. The added stage is where the
two jobs meet: each job's rank 0 asks Ray's State API which actors are alive, so the jobs pass only if
Ray itself had both jobs' Ray Train workers alive at the same moment."""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab.datasets import CleanSplit, load_dataset
from pipeline import driver
from pipeline.artifacts import METRICS, StageMetrics, encode_output
from pipeline.config import JobConfig
from pipeline.shard_writer import write_shards
from pipeline.shards import open_shards
from pipeline.storage import Storage, StorageSettings
from pipeline.tracking import Tracker
from pipeline.workers import report, world

pytestmark = pytest.mark.slow


def _wait_for(condition, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def summary_stage(meeting: Path, others: dict[str, str], wait_s: float = 300.0):
    """An extra stage for the test: reports the run name and the world size it ran on, and how many of the
    other job's workers Ray's own state showed alive while this job's workers were alive too.

    Every rank leaves its Ray actor id in `meeting/<run name>/` (a folder both jobs' workers see); rank 0
    waits for the other job's ids, then asks Ray's State API which actors are ALIVE and counts the other
    job's among them. Neither job's workers leave before both rank 0s have asked (a second mark), so each
    job's answer is read while both worker groups exist. Jobs that ran one after the other count 0: the
    first waits in vain for ids, and the second finds the first's workers DEAD."""

    def stage(config: dict) -> dict:
        import ray
        from ray.util.state import list_actors

        ctx = config["context"]
        rank, size = world()
        mine, theirs = meeting / ctx.run_name, meeting / others[ctx.run_name]
        mine.mkdir(exist_ok=True)
        (mine / f"rank{rank}").write_text(ray.get_runtime_context().get_actor_id())
        alive_other = 0
        if rank == 0:
            if _wait_for(lambda: theirs.is_dir() and len(list(theirs.glob("rank*"))) == size, wait_s):
                ids = {f.read_text() for f in theirs.glob("rank*")}
                alive = {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)}
                alive_other = len(ids & alive)
            (meeting / f"{ctx.run_name}.asked").touch()
        _wait_for(lambda: all((meeting / f"{name}.asked").exists() for name in (ctx.run_name, others[ctx.run_name])),
                  wait_s)
        output = StageMetrics({"summary_world": size, "summary_other_alive": alive_other})
        files = {"summary.txt": ctx.run_name.encode(), METRICS: encode_output(output)}
        report(output.metrics(), files if rank == 0 else None)
        return output.metrics()

    return stage


@pytest.fixture
def two_s3():
    """Two S3 APIs on loopback, each in its own process (moto's servers in one process share their
    buckets), to hold different data under the same URL."""
    import subprocess
    import urllib.request

    from conftest import free_port

    servers, urls = [], []
    try:
        for _ in range(2):
            port = free_port()
            servers.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"moto server at {url} did not start") from None
                    time.sleep(0.3)
        yield urls
    finally:
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def test_two_jobs_with_their_own_stores_run_at_once(ray_session, digits_lab, two_s3, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    summary = summary_stage(meeting, {"job-a": "job-b", "job-b": "job-a"})
    monkeypatch.setattr(driver, "STAGES", driver.STAGES + (driver.Stage("summary", summary),))
    split = CleanSplit.load(digits_lab.dval_path)
    dval = load_dataset("digits", "train").subset(split.indices)
    sizes = {"a": 60, "b": 50}
    configs = {}
    for (name, endpoint), size in zip({"a": two_s3[0], "b": two_s3[1]}.items(), sizes.values(), strict=True):
        store = Storage(StorageSettings(s3_endpoint=endpoint))
        store.s3_client().create_bucket(Bucket="fip-test")
        write_shards(dval.subset(range(size)), "s3://fip-test/concurrent/dval", maxcount=25, store=store)
        assert open_shards("s3://fip-test/concurrent/dval", store).total == size
        configs[name] = JobConfig.from_dict({
            "inputs": {"model": str(digits_lab.model_path), "clean": "s3://fip-test/concurrent/dval"},
            "purify": {"iterations": 4, "batch_size": 16, "eta_f": 0.002, "trace_every": 2, "trace_batch": 8},
            "resources": {"workers": 2, "cpus_per_worker": 0.5},
            "run": {"work_dir": str(tmp_path / name / "jobs"), "run_name": f"job-{name}", "checkpoint_every": 2},
            "storage": {"s3_endpoint": endpoint},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / name / 'mlflow.db'}", "register_as": f"model-{name}"},
            "analysis": {"esd_samples": 0},
        })
    def run(name):
        return name, driver.run_job(configs[name], progress=lambda msg: None)

    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, configs))
    for name, result in results.items():
        other = "b" if name == "a" else "a"
        m = result.metrics
        # Ray's state, read by this job's rank 0 while its own workers ran: both of the other job's workers ALIVE
        assert m["summary_other_alive"] == 2, (f"Ray showed {m['summary_other_alive']} of job-{other}'s 2 workers "
                                               f"alive while job-{name}'s ran: the jobs did not run at once")
        assert m["fisher_count"] == sizes[name]  # read from its own endpoint: same URL, different data
        assert m["summary_world"] == 2 and (result.purified_path.parent / "summary.txt").read_text() == f"job-{name}"
        tracker = Tracker(configs[name].tracking.tracking_uri, create=False)
        run = tracker.client.get_run(result.run_id)
        assert run.info.run_name == f"job-{name}" and run.info.status == "FINISHED"
        assert "summary.txt" in {a.path for a in tracker.client.list_artifacts(result.run_id)}
        assert [r["name"] for r in tracker.list_models()] == [f"model-{name}"]
        names = [r.info.run_name for r in tracker.client.search_runs([run.info.experiment_id])]
        assert names == [f"job-{name}"] and f"job-{other}" not in names
