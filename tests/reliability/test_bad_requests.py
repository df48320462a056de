"""Requests this machine cannot meet (issue 22, class 6): a local Ray (no --address) is never asked for more
CPUs than the machine has (`--workers 64` on 2 CPUs started ~62 Ray workers and hung), and a batch larger
than D_val is refused rather than cut short on every step. Refused in one line before Ray starts, in-process."""

import os

import pytest
from reliability.harness import judge_error, run_main
from reliability.tiny_job import tiny_inputs  # noqa: F401

CPUS = os.cpu_count() or 1


def _job(command: str, inputs, tmp, *flags: str) -> list[str]:
    return [command, "--model", inputs.model, "--clean", inputs.clean, "--work-dir", str(tmp / "jobs"),
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *flags]


CASES = {  # (command, flags, what the error must name)
    "purify --workers 64": ("purify", ["--workers", "64", "--batch-size", "64"],
                            ("workers 64", "cpus_per_worker", f"has {CPUS}")),
    "purify --cpus-per-worker beyond the machine": ("purify", ["--workers", "1", "--cpus-per-worker", str(CPUS + 1),
                                                               "--batch-size", "16"],
                                                    ("cpus_per_worker", f"has {CPUS}")),
    "tune: workers plus the trial's own CPU": ("tune", ["--workers", "1", "--cpus-per-worker", str(CPUS),
                                                        "--batch-size", "16"],
                                               ("cpus_per_worker", "trial_cpus", f"has {CPUS}")),
    "purify --batch-size beyond D_val": ("purify", ["--workers", "1", "--batch-size", "512"],
                                         ("batch_size 512", "140 clean samples")),
    "tune --batch-size beyond the trials' share of D_val": ("tune", ["--workers", "1", "--batch-size", "128"],
                                                           ("batch_size 128", "clean samples")),
    "purify --iterations 10000000000": ("purify", ["--workers", "1", "--iterations", "10000000000"],
                                        ("iterations", "10000000000")),
    "tune --iterations 10000000000": ("tune", ["--workers", "1", "--iterations", "10000000000"],
                                      ("iterations", "10000000000")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_request_beyond_the_machine(case, tiny_inputs, tmp_path, monkeypatch, verdict):  # noqa: F811
    command, flags, names = CASES[case]
    if case == "purify --workers 64" and CPUS >= 64:
        pytest.skip("this machine has 64 CPUs")
    monkeypatch.chdir(tmp_path)
    obs = run_main(_job(command, tiny_inputs, tmp_path, *flags))
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"fip {case}")


def test_address_is_not_checked_against_this_machine():
    """With --address the cluster's own size decides (checked once Ray is connected): nothing refused here."""
    from pipeline.config import Resources
    from pipeline.ray_runtime import check_local_cpus

    check_local_cpus(Resources(workers=64, address="ray://head:10001"))
