"""Two `fip purify` typed at the same moment on one machine, each starting its own local Ray: both must
finish and both land their MLflow run and model version (once, one of them was lost: "The current node
timed out during startup", docs/stack-notes.md).

~60-120 s on 2 loaded cores (two tiny jobs side by side): heavy, run by `make reliability` and `make test-heavy`.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
from reliability.harness import run_process
from reliability.tiny_job import mlflow_state, purify_argv, quiet_env, tiny_inputs  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_two_jobs_started_together(tiny_inputs, tmp_path, verdict):  # noqa: F811
    works = [tmp_path / "a", tmp_path / "b"]
    for work in works:
        work.mkdir()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda w: run_process(purify_argv(tiny_inputs, w), w, timeout=400, env=quiet_env()),
                             works))
    states = [mlflow_state(w) for w in works]
    detail = "; ".join(f"job {name}: exit {o.rc} in {o.seconds:.0f} s, runs {s.runs}, versions {s.versions}"
                       for name, o, s in zip("ab", runs, states, strict=True))
    landed = all(o.rc == 0 and s.runs == ["FINISHED"] and s.versions == ["READY"] for o, s in zip(runs, states,
                                                                                                    strict=True))
    if not landed:
        failed = next(o for o, s in zip(runs, states, strict=True) if o.rc != 0 or s.runs != ["FINISHED"])
        detail += f"; last lines: {(failed.out + failed.err).strip().splitlines()[-3:]}"
    verdict("concurrency", "recovered", ("recovered" if landed else "data lost", detail),
            max(o.seconds for o in runs), case="two fip purify started together, each its own local Ray")
