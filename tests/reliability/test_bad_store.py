"""A dead or wrong MLflow store (issue 22, class 2): every command that opens one checks it first
(:func:`pipeline.tracking.check_store`) and is refused in one line within seconds, where MLflow's client
retried a dead server for 252 s, a folder given as an SQLite file retried too, and a bare folder (a file
store, which MLflow 3 refuses) ended in a traceback. All in-process and refused before Ray starts, except
the one case that starts a real `mlflow server` to show a live one passes."""

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port
from reliability.harness import judge_error, run_main
from reliability.tiny_job import tiny_inputs  # noqa: F401

FAST_S = 10.0  # the check waits at most 5 s (pipeline.tracking.STORE_CHECK_TIMEOUT_S)


@pytest.fixture(scope="module")
def silent_server():
    """A port that accepts connections and never answers (a hung server, or a firewall that drops replies)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture(scope="module")
def not_mlflow():
    """A web server that is not MLflow: every path is 404."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


def _store(case: str, tmp_path, silent: str, other: str) -> tuple[str, tuple[str, ...]]:
    """The tracking URI of a case, and what the error must name."""
    if case == "dead server":
        uri = f"http://127.0.0.1:{free_port()}"
        return uri, (uri, "does not answer")
    if case == "silent server":
        return silent, (silent, "does not answer", "timed out")
    if case == "not an MLflow server":
        return other, (other, "not an MLflow server", "404")
    if case == "sqlite path is a folder":
        return f"sqlite:///{tmp_path}", (str(tmp_path), "folder")
    if case == "bare folder":
        return str(tmp_path), (str(tmp_path), "file store")
    if case == "sqlite path is not a database":
        bad = tmp_path / "notes.db"
        bad.write_text("not a database\n")
        return f"sqlite:///{bad}", (str(bad), "not an SQLite database")
    if case == "unknown scheme":
        return "ftp://127.0.0.1/mlflow", ("ftp", "unknown scheme")
    raise AssertionError(case)


CASES = ["dead server", "silent server", "not an MLflow server", "sqlite path is a folder", "bare folder",
         "sqlite path is not a database", "unknown scheme"]


@pytest.mark.parametrize("case", CASES)
def test_models_list(case, tmp_path, silent_server, not_mlflow, verdict):
    uri, names = _store(case, tmp_path, silent_server, not_mlflow)
    obs = run_main(["models", "--tracking-uri", uri, "list"])
    judged = judge_error(obs, names)
    if judged[0] == "clean error" and obs.seconds > FAST_S:
        judged = ("hang", f"refused only after {obs.seconds:.0f} s: {judged[1]}")
    verdict("fault", "clean error", judged, obs.seconds, case=f"fip models list: {case}")


@pytest.mark.parametrize("case", ["dead server", "sqlite path is a folder"])
def test_purify(case, tiny_inputs, tmp_path, monkeypatch, silent_server, not_mlflow, verdict):  # noqa: F811
    """Refused before Ray starts and before any run is opened."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "store"
    folder.mkdir()
    uri, names = _store(case, folder, silent_server, not_mlflow)
    obs = run_main(["purify", "--model", tiny_inputs.model, "--clean", tiny_inputs.clean, "--workers", "1",
                    "--batch-size", "16", "--work-dir", str(tmp_path / "jobs"), "--tracking-uri", uri])
    judged = judge_error(obs, names)
    if judged[0] == "clean error" and obs.seconds > FAST_S:
        judged = ("hang", f"refused only after {obs.seconds:.0f} s: {judged[1]}")
    verdict("fault", "clean error", judged, obs.seconds, case=f"fip purify: {case}")


def test_tune_dead_server(tiny_inputs, tmp_path, monkeypatch, verdict):  # noqa: F811
    """Refused before D_val is split (nothing written) and before Ray starts."""
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    obs = run_main(["tune", "--model", tiny_inputs.model, "--clean", tiny_inputs.clean, "--workers", "1",
                    "--batch-size", "16", "--work-dir", str(tmp_path / "jobs"), "--tracking-uri", uri])
    judged = judge_error(obs, (uri, "does not answer"))
    if (tmp_path / "jobs").exists():
        judged = ("data lost", f"the refused sweep wrote {sorted(p.name for p in (tmp_path / 'jobs').iterdir())}")
    verdict("fault", "clean error", judged, obs.seconds, case="fip tune: dead server")


def test_evaluate_registered_model_dead_server(tiny_inputs, verdict):  # noqa: F811
    uri = f"http://127.0.0.1:{free_port()}"
    obs = run_main(["evaluate", "--tracking-uri", uri, "--model", "models:/fip-purified@candidate",
                    "--test", tiny_inputs.test])
    verdict("fault", "clean error", judge_error(obs, (uri, "does not answer")), obs.seconds,
            case="fip evaluate models:/...: dead server")


@pytest.mark.slow
def test_live_mlflow_server_passes(tmp_path):
    """The check asks what `mlflow server` answers: a live one passes at once and the command runs."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                               "--artifacts-destination", str(tmp_path / "mlartifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        from pipeline.tracking import check_store

        start = time.perf_counter()
        check_store(uri)
        checked = time.perf_counter() - start
        obs = run_main(["models", "--tracking-uri", uri, "list"])
        assert obs.rc == 0, obs.err
        assert "no registered models" in obs.out
        assert checked < 1.0, f"the check of a live server took {checked:.2f} s"
    finally:
        server.terminate()
        server.wait(30)
