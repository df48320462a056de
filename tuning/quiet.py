"""Ray Tune's own terminal output goes to the sweep's folder; the terminal keeps ours.

Tune prints an experiment banner, the result folder, a TensorBoard hint and, after Ctrl-C, "Resume experiment
with: Tuner.restore(...)", whatever the run's verbosity; the command that resumes a sweep is ours (``fip tune
--resume``). While a sweep runs, :func:`tune_output_to` routes the driver's stdout by line: lines that start
with ``[fip`` (the live table, our progress) reach the terminal, the rest is appended to a log file in the
sweep's folder, where Tune keeps its experiment state; Tune's restore hint is dropped from its logger. The
searcher's own log lines (Optuna's "A new study created in memory", on stderr) go to the same file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from pathlib import Path
from typing import TextIO

OURS = "[fip"
TUNE_LOGGER = "ray.tune.tune"
SEARCHER_LOGGER = "optuna"  # its handler is installed when the searcher imports optuna, before a sweep starts


class _LineRouter(io.TextIOBase):
    """A text stream that sends what starts with `OURS` (and the line ends after it) to `terminal`, the rest to `log`."""

    def __init__(self, terminal: TextIO, log: TextIO) -> None:
        self.terminal, self.log, self._ours = terminal, log, False

    def write(self, text: str) -> int:
        if text.strip("\n"):
            self._ours = text.startswith(OURS)
        (self.terminal if self._ours else self.log).write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return False


class _DropRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


@contextlib.contextmanager
def tune_output_to(log_path: str | Path):
    """Within the block, Tune's printed output is appended to `log_path` and its restore hint is not shown."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    hint_filter, tune_logger = _DropRestoreHint(), logging.getLogger(TUNE_LOGGER)
    searcher_logger = logging.getLogger(SEARCHER_LOGGER)
    with open(log_path, "a") as log:
        router = _LineRouter(sys.stdout, log)
        tune_logger.addFilter(hint_filter)
        searcher_handlers, searcher_propagates = searcher_logger.handlers[:], searcher_logger.propagate
        to_log = logging.StreamHandler(log)
        to_log.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s] %(message)s"))
        # only to the log: a library may have turned optuna's propagation on, and the root's handlers write to stderr
        searcher_logger.handlers, searcher_logger.propagate = [to_log], False
        try:
            with contextlib.redirect_stdout(router):
                yield
        finally:
            tune_logger.removeFilter(hint_filter)
            searcher_logger.handlers, searcher_logger.propagate = searcher_handlers, searcher_propagates
            router.flush()
