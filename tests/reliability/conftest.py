"""Fixtures of the reliability suite; `verdict` records each case for the report (see harness.py)."""

import json
import platform
import time
from pathlib import Path

import pytest
from reliability.harness import GOOD, KINDS, Outcome, Recorder

RECORDER = pytest.StashKey[Recorder]()


def _recorder(config: pytest.Config) -> Recorder:
    if RECORDER not in config.stash:
        config.stash[RECORDER] = Recorder()
    return config.stash[RECORDER]


@pytest.fixture
def verdict(request):
    """`verdict(kind, expected, (observed_verdict, detail), seconds, case=None)` records the case and fails
    the test unless the observed verdict is the expected one (which is always a good one)."""

    def check(kind: str, expected: str, judged: tuple[str, str], seconds: float = 0.0, case: str | None = None):
        assert kind in KINDS and expected in GOOD
        observed, detail = judged
        name = case or request.node.name.removeprefix("test_")
        source = Path(str(request.node.path)).stem
        _recorder(request.config).add(Outcome(name, kind, expected, detail, observed, seconds, source))
        assert observed == expected, f"{name}: expected {expected}, got {observed}: {detail}"

    return check


def pytest_terminal_summary(terminalreporter, config):
    rec = config.stash.get(RECORDER, None)
    if not rec or not rec.outcomes:
        return
    counts = rec.counts()
    terminalreporter.write_sep("-", "reliability cases")
    for kind, row in counts.items():
        terminalreporter.write_line(f"{kind}: {row['good']}/{row['cases']} clean error or recovered")
    path = config.getoption("reliability_report", None)
    if path:
        header = (f"# Reliability suite\n\nWritten by `make reliability` on {time.strftime('%Y-%m-%d %H:%M')} "
                  f"({platform.node()}, Python {platform.python_version()}). Each case runs the real parts "
                  "(CLI, Ray, MLflow, S3 on loopback); `tests/reliability/` holds them.")
        Path(path).write_text(rec.markdown(header))
        Path(path).with_suffix(".json").write_text(json.dumps({"counts": counts, "cases": rec.json()}, indent=1))
        terminalreporter.write_line(f"report: {path}")
