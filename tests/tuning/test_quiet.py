"""Ray Tune's own printed output goes to the sweep's folder; ours reaches the terminal (tuning.quiet)."""

import logging

from tuning.quiet import SEARCHER_LOGGER, TUNE_LOGGER, tune_output_to


def test_tune_output_goes_to_the_log_and_ours_to_the_terminal(tmp_path, capsys, caplog):
    log = tmp_path / "sweep" / "tune-output.log"
    with tune_output_to(log):
        print("+----------------------------------+\n| Configuration for experiment     |")
        print("[fip tune]\ntrial     status   step  objective")
        print("\nView detailed results here: /somewhere")
        print("[fip tune] D_val split: 100 to train on")
        logging.getLogger(TUNE_LOGGER).warning("Experiment has been interrupted.\n"
                                               "Resume experiment with: Tuner.restore(path=...)")
    logging.getLogger(TUNE_LOGGER).warning("a later warning of Tune's is shown")
    out = capsys.readouterr().out
    assert out == "[fip tune]\ntrial     status   step  objective\n[fip tune] D_val split: 100 to train on\n"
    assert "Configuration for experiment" in log.read_text() and "View detailed results here" in log.read_text()
    assert "Tuner.restore" not in caplog.text and "a later warning" in caplog.text


def test_the_searchers_log_lines_go_to_the_log(tmp_path):
    import optuna  # noqa: F401  (installs optuna's stderr handler, as the sweep's searcher does)

    class Kept(logging.Handler):  # the root logger's handler, as a library's logging setup adds one (to stderr)
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    log = tmp_path / "tune-output.log"
    study_logger, searcher = logging.getLogger(f"{SEARCHER_LOGGER}.study.study"), logging.getLogger(SEARCHER_LOGGER)
    before = searcher.handlers[:]
    root = Kept()
    logging.getLogger().addHandler(root)
    searcher.propagate = True  # as a library may turn it on (optuna.logging.enable_propagation)
    try:
        with tune_output_to(log):
            study_logger.info("A new study created in memory with name: optuna")
        assert searcher.handlers == before and searcher.propagate  # given back after the sweep
    finally:
        logging.getLogger().removeHandler(root)
        searcher.propagate = False
    assert "A new study created in memory" in log.read_text()
    assert root.messages == []  # not passed on to the root's handlers, which write to the terminal
