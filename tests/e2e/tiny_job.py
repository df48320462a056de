"""The tiny digits job that tests/e2e/test_job.py runs and pins, and a command that prints its figures.

``python tests/e2e/tiny_job.py [--threads N]`` runs the job once in a fresh local Ray (shards on local
disk; S3 or not, the bytes are the same) and prints the pinned figures as JSON. Run it under
``ATEN_CPU_CAPABILITY=default|avx2|avx512`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` with 1 and 2 threads to
measure the spread that tests/e2e/pinned/tiny_job.json's tolerance must cover (docs/stack-notes.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PURIFY = dict(eval_every=6, eta_f=0.002, eta_r=1.0, lr=0.01, iterations=12, batch_size=16, trace_every=2,
              trace_estimator="exact", trace_batch=16, seed=3)
PINNED = Path(__file__).parent / "pinned" / "tiny_job.json"


def job_config(lab, clean: str, test: str, tmp: Path, s3_endpoint: str | None = None, **sections):
    """The tiny job on `lab`'s suspect: 2 workers, 12 FIP iterations, benchmark mode."""
    from pipeline.config import JobConfig, merge

    base = {"inputs": {"model": str(lab.model_path), "clean": clean, "test": test,
                       "attack_record": str(lab.record_path)},
            "purify": PURIFY, "resources": {"workers": 2},
            "run": {"work_dir": str(tmp / "jobs"), "checkpoint_every": 4},
            "storage": {"s3_endpoint": s3_endpoint},
            "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
            "analysis": {"esd_samples": 16, "esd_steps": 4}}
    return JobConfig.from_dict(merge(base, sections))


def write_job_shards(lab, clean: str, test: str, store=None) -> None:
    """D_val in shards of 30 (30, ..., 20: the ranks' shares) and the test set in shards of 100."""
    from lab.datasets import CleanSplit, load_dataset
    from pipeline.shard_writer import write_shards

    split = CleanSplit.load(lab.dval_path)
    train, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
    write_shards(train.subset(split.indices), clean, maxcount=30, indices=split.indices, store=store)
    write_shards(test_set, test, maxcount=100)


def figures(result) -> dict:
    """What the pinned file holds: the metrics it names and the last step's cross-entropy."""
    pinned = json.loads(PINNED.read_text())
    return {**{k: result.metrics[k] for k in pinned["metrics"]}, "final_ce": result.history[-1]["ce"]}


def off_pinned(got: dict) -> dict:
    """The figures in `got` that are off the pinned ones by more than that figure's tolerance: (got, pinned)."""
    pinned = json.loads(PINNED.read_text())
    want = {**pinned["metrics"], "final_ce": pinned["final_ce"]}
    tol = pinned["tolerance"]
    return {k: (got[k], v) for k, v in want.items() if abs(got[k] - v) > tol[k]["abs"] + tol[k]["rel"] * abs(v)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per Ray Train worker")
    parser.add_argument("--purify", action="append", default=[], metavar="KEY=VALUE",
                        help="change one purify setting (e.g. eta_f=0.004): does the pinned test catch it?")
    args = parser.parse_args()
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.purify)}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from digits_lab import copy_to

    from pipeline.driver import run_job

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        lab = copy_to(tmp / "lab")
        write_job_shards(lab, str(tmp / "dval"), str(tmp / "test"))
        cfg = job_config(lab, str(tmp / "dval"), str(tmp / "test"), tmp,
                         resources={"threads_per_worker": args.threads}, tracking={"register_as": None},
                         purify=changes)
        got = figures(run_job(cfg, progress=lambda _: None))
        print(json.dumps({"figures": got, "off_pinned": off_pinned(got)}), flush=True)


if __name__ == "__main__":
    main()
