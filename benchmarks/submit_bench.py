"""Job submission on the local stand-in (cluster.local): submission-to-start latency (submit until the
job's status is RUNNING) and the end-to-end time of the tiny digits purification of
tests/e2e/test_submit.py (12 iterations, 2 Ray Train workers), each over a few repeats.

    flock /tmp/fip-ray.lock .venv/bin/python -m benchmarks.submit_bench [--repeats 3]

Starts its own Ray head, MLflow server and S3 API on loopback and stops them at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, markdown_table, write_results
from cluster import local
from cluster.submit import Jobs, Submission, purify_submission, repo_root
from pipeline.config import JobConfig

TINY = {"eval_every": 6, "eta_f": 0.002, "eta_r": 1.0, "lr": 0.01, "iterations": 12, "batch_size": 16,
        "trace_every": 2, "trace_estimator": "exact", "trace_batch": 16, "seed": 3}


def _digits_lab(out: Path):
    """The e2e tests' backdoored digits ViT (cached: the lab reuses a model made with the same config)."""
    from lab.attacks import AttackConfig
    from lab.backdoor import LabConfig, make_backdoored_model
    from lab.train import TrainConfig

    cfg = LabConfig(attack=AttackConfig("badnets", params={"size": 2}), dataset="digits", arch="vit-small",
                    width=0.25, train=TrainConfig(epochs=25, batch_size=64, lr=0.05), clean_fraction=0.1)
    return make_backdoored_model(cfg, out, progress=False)


def _until_running(jobs: Jobs, job_id: str, t0: float) -> float:
    status = jobs.wait(job_id, ["RUNNING"], timeout=300, poll=0.05)
    if status != "RUNNING":
        raise RuntimeError(f"job {job_id} ended {status} before running: {jobs.logs(job_id)[-2000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from lab.datasets import CleanSplit, load_dataset
    from pipeline.shard_writer import write_shards

    lab = _digits_lab(CACHE / "submit-bench")
    tmp = Path(tempfile.mkdtemp(prefix="fip-submit-bench-"))
    temp = Path(tempfile.mkdtemp(prefix="fip-ray-b-", dir="/tmp"))
    t = time.perf_counter()
    cluster = local.up(tmp / "cluster", env=os.environ, ray_temp_dir=temp, dashboard_port=0, mlflow_port=0,
                       s3_port=0, with_s3=False, progress=lambda m: None)
    startup = time.perf_counter() - t
    try:
        split = CleanSplit.load(lab.dval_path)
        write_shards(load_dataset("digits", "train").subset(split.indices), str(tmp / "dval"), maxcount=30,
                     indices=split.indices)
        write_shards(load_dataset("digits", "test"), str(tmp / "test"), maxcount=100)
        jobs = Jobs(cluster.ray_address)
        rows, trivial, tiny = [], [], []
        for i in range(args.repeats):
            # a job that does nothing: the cost of uploading the code and starting a driver
            t0 = time.perf_counter()
            job_id = jobs.submit(Submission("fip", f"{sys.executable} -c pass", repo_root()))
            trivial.append(_until_running(jobs, job_id, t0))
            jobs.wait(job_id, [], timeout=120)
            cfg = JobConfig.from_dict({
                "inputs": {"model": str(lab.model_path), "clean": str(tmp / "dval"), "test": str(tmp / "test"),
                           "attack_record": str(lab.record_path)},
                "purify": TINY, "resources": {"workers": 2},
                "run": {"work_dir": str(tmp / "jobs"), "checkpoint_every": 4},
                "tracking": {"tracking_uri": cluster.tracking_uri},
                "analysis": {"esd_samples": 16, "esd_steps": 4}})
            sub, _ = purify_submission(cfg, repo_root())
            t0 = time.perf_counter()
            job_id = jobs.submit(sub)
            submitted = time.perf_counter() - t0
            running = _until_running(jobs, job_id, t0)
            status = jobs.wait(job_id, [], timeout=900)
            total = time.perf_counter() - t0
            if status != "SUCCEEDED":
                raise RuntimeError(f"tiny job {job_id} {status}: {jobs.logs(job_id)[-2000:]}")
            tiny.append({"submit_call_s": submitted, "to_running_s": running, "end_to_end_s": total})
            rows.append([i + 1, trivial[-1], submitted, running, total])
            print(f"repeat {i + 1}: trivial job RUNNING after {trivial[-1]:.2f} s; tiny job: submit call "
                  f"{submitted:.2f} s, RUNNING after {running:.2f} s, SUCCEEDED after {total:.1f} s", flush=True)
    finally:
        cluster.stop(progress=lambda m: None)
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {"stand_in_startup_s": startup,
               "trivial_to_running_s_median": statistics.median(trivial),
               "tiny_to_running_s_median": statistics.median(r["to_running_s"] for r in tiny),
               "tiny_end_to_end_s_median": statistics.median(r["end_to_end_s"] for r in tiny)}
    payload = {"summary": summary, "trivial_to_running_s": trivial, "tiny": tiny, "cpus": os.cpu_count()}
    md = ("# Job submission on the local stand-in\n\n"
          f"{os.cpu_count()} CPU cores; the stand-in (Ray head + dashboard, mlflow server) started in "
          f"{startup:.1f} s. Times from the submitting call; RUNNING is Ray's job status (the driver process "
          "has started). The tiny job is tests/e2e/test_submit.py's digits purification (12 iterations, "
          "2 Ray Train workers, MLflow logging and registration).\n\n"
          + markdown_table(["repeat", "trivial job: to RUNNING (s)", "tiny job: submit call (s)",
                            "tiny job: to RUNNING (s)", "tiny job: to SUCCEEDED (s)"], rows))
    write_results("submit", payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
