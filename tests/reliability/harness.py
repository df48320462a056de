"""The reliability suite's bookkeeping: run a command the way a user would, judge what came back, and
keep a verdict per case for the report (`make reliability` -> benchmarks/results/reliability.md).

Verdicts (issue 13): "clean error" (non-zero exit, one line naming the problem), "recovered" (the fault
was survived and the job finished right), and the failures "traceback", "vague error" (one line that
does not name the problem), "hang", "silent wrong" (exit 0 or a wrong result) and "data lost".
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path

GOOD = ("clean error", "recovered")
BAD = ("traceback", "vague error", "hang", "silent wrong", "data lost")
KINDS = ("bad input", "fault", "concurrency", "secret", "estimate")


@dataclass
class Observed:
    """What a command left: exit code (None when it had to be killed), its output and how long it took."""

    rc: int | None
    out: str
    err: str
    seconds: float
    timed_out: bool = False
    exception: str | None = None  # an exception that escaped the CLI's own handling, with its traceback


@dataclass
class Outcome:
    case: str
    kind: str
    expected: str
    observed: str
    verdict: str
    seconds: float
    source: str = ""  # the test file, which is the class of fault it belongs to (e.g. test_bad_sources)


def run_main(argv: list[str]) -> Observed:
    """Call `fip` in this process (cheap: no interpreter start); an escaping exception is a traceback."""
    from fipcli.main import main

    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    exception = None
    with redirect_stdout(out), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException:  # noqa: BLE001 - the point is to see what escapes
            rc, exception = None, traceback.format_exc()
    return Observed(rc, out.getvalue(), err.getvalue(), time.perf_counter() - start, exception=exception)


def run_call(fn: Callable[[], object]) -> Observed:
    """Call a library function as a command does (e.g. a sweep's winner registration): an error the CLI shows
    in one line (:func:`fipcli.main.user_facing`) becomes exit 2 with that line; anything else is a traceback."""
    from fipcli.main import user_facing

    start = time.perf_counter()
    rc, err, exception = 0, "", None
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to see what escapes
        if user_facing(e):
            rc, err = 2, f"error: {e}"
        else:
            rc, exception = None, traceback.format_exc()
    return Observed(rc, "", err, time.perf_counter() - start, exception=exception)


def fip_command() -> list[str]:
    return [sys.executable, "-m", "fipcli.main"]


def fip_script() -> list[str]:
    """The installed `fip` console script, as a user types it (unlike `python -m`, it does not put the
    current directory on sys.path)."""
    return [str(Path(sys.executable).parent / "fip")]


def run_process(argv: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None,
                interrupt_after: float | None = None, interrupt_when: str | None = None,
                sig: int = signal.SIGINT, command: list[str] | None = None, to_group: bool = True) -> Observed:
    """Run `fip ARGV` (`command` ARGV: default `python -m fipcli.main`) as a user's shell would, in its own
    process group; optionally send `sig` `interrupt_after` seconds in, or once `interrupt_when` appears in
    its output: to the whole group (`to_group`, as Ctrl-C does), or to the `fip` process alone (as `kill PID`
    and `fip jobs stop` do)."""
    start = time.perf_counter()
    proc = subprocess.Popen((command or fip_command()) + argv, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT if interrupt_when else subprocess.PIPE,
                            text=True, start_new_session=True)
    out_lines: list[str] = []
    if interrupt_when is not None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out_lines.append(line)
            if interrupt_when in line:
                _send(proc.pid, sig, to_group)
                break
            if time.perf_counter() - start > timeout:
                break
    elif interrupt_after is not None:
        try:
            proc.wait(interrupt_after)
        except subprocess.TimeoutExpired:
            _send(proc.pid, sig, to_group)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return Observed(None if timed_out else proc.returncode, "".join(out_lines) + (out or ""), err or "",
                    time.perf_counter() - start, timed_out=timed_out)


def _send(pid: int, sig: int, to_group: bool) -> None:
    if to_group:
        os.killpg(pid, sig)  # the process was started as its group's leader
    else:
        os.kill(pid, sig)


def judge_error(obs: Observed, names: str | tuple[str, ...]) -> tuple[str, str]:
    """Verdict for a case that must be refused: non-zero exit, no traceback, and the last line of stderr
    naming the problem (`names`: text that must appear in it, e.g. the setting, file or shard)."""
    wanted = (names,) if isinstance(names, str) else names
    last = next((line for line in reversed(obs.err.strip().splitlines()) if line.strip()), "")
    if obs.timed_out:
        return "hang", f"killed after {obs.seconds:.0f} s"
    if obs.exception is not None:
        return "traceback", obs.exception.strip().splitlines()[-1]
    if obs.rc == 0:
        return "silent wrong", "exit 0" + (f"; stderr: {last}" if last else "")
    if "Traceback (most recent call last)" in obs.err + obs.out:
        return "traceback", last
    message = re.sub(r"^fip( [\w-]+)*: error: ", "", last)  # the prefix names the command, not the problem
    if not all(w.lower() in message.lower() for w in wanted):
        return "vague error", last or f"exit {obs.rc}, nothing on stderr"
    return "clean error", last


class Recorder:
    """Every case's outcome in this session, in the order they ran."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def counts(self, by: str = "kind") -> dict[str, dict[str, int]]:
        """Cases, good ones and each verdict, per `by` (an Outcome field: kind, or source, the test file)."""
        table: dict[str, dict[str, int]] = {}
        for o in self.outcomes:
            row = table.setdefault(getattr(o, by), {"cases": 0, "good": 0})
            row["cases"] += 1
            row["good"] += o.verdict in GOOD
            row[o.verdict] = row.get(o.verdict, 0) + 1
        return table

    def markdown(self, header: str) -> str:
        lines = [header, "", "| kind | cases | clean error or recovered | otherwise |", "|---|---|---|---|"]
        for kind, row in self.counts().items():
            rest = ", ".join(f"{v}: {n}" for v, n in row.items() if v in BAD) or "-"
            lines.append(f"| {kind} | {row['cases']} | {row['good']} | {rest} |")
        lines += ["", "| file (class of fault) | cases | clean error or recovered |", "|---|---|---|"]
        for source, row in sorted(self.counts("source").items()):
            lines.append(f"| `{source}` | {row['cases']} | {row['good']} |")
        lines += ["", "| case | kind | expected | observed | verdict | s |", "|---|---|---|---|---|---|"]
        for o in self.outcomes:
            observed = o.observed.replace("|", "\\|").replace("\n", " ")
            if len(observed) > 160:
                observed = observed[:157] + "..."
            lines.append(f"| `{o.case}` | {o.kind} | {o.expected} | {observed} | **{o.verdict}** | {o.seconds:.1f} |")
        return "\n".join(lines) + "\n"

    def json(self) -> list[dict]:
        return [asdict(o) for o in self.outcomes]
