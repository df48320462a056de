"""Run `fip` commands as Ray jobs on a cluster, through Ray's jobs API (the head's dashboard, :8265).

A job carries everything it needs and nothing secret. Its runtime environment is this repository's
code as a ``working_dir`` (without .venv, runs, .cache, .git and what .gitignore lists) plus
optional pip requirements; a purification job's whole config travels in that folder as
``job.yaml``, written by :meth:`pipeline.config.JobConfig.to_yaml`, and the entrypoint is a real
``fip purify --config job.yaml``. The MLflow tracking URI and the S3 endpoint are settings in that
config. Credentials are not: the cluster holds its own (a Kubernetes Secret, an instance role, the
environment of whoever started the local stand-in), because Ray writes every runtime_env value,
``env_vars`` included, in plain text to its logs (docs/cluster.md). Nothing here reads the
environment; the `fip` command does that at its edge.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.storage import absolute_url

# never uploaded: environments, outputs, caches and history (Ray also skips what .gitignore lists)
EXCLUDES = (".venv", "venv", "runs", ".cache", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
            ".ruff_cache", "mlruns", "mlflow.db", "mlartifacts", "artifacts", "demo-out", "*.pyc")
JOB_YAML = "job.yaml"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# scheme://user:password@host: a credential inside a URL
_USERINFO = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s@:]+:[^/\s@]+@", re.IGNORECASE)


class SubmitError(ValueError):
    """A job cannot be submitted or followed as asked; the message says why in one line."""


def repo_root() -> Path:
    """The checkout this code runs from: what a job's working_dir uploads."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise SubmitError(f"{root} is not a fip-purify checkout (no pyproject.toml): pass --working-dir")
    return root


def check_no_credentials(values: Iterable[tuple[str, str]]) -> None:
    """Refuse a URL that carries a user and password: a job's settings end up in Ray's logs and in
    MLflow params, so credentials must come from the cluster, never from the job."""
    for where, value in values:
        if isinstance(value, str) and _USERINFO.search(value):
            raise SubmitError(f"{where} holds a URL with a user and password: the cluster must hold credentials "
                              f"(docs/cluster.md), a job passes only addresses")


def _strings(data: dict, prefix: str = "") -> Iterable[tuple[str, str]]:
    for k, v in data.items():
        if isinstance(v, dict):
            yield from _strings(v, f"{prefix}{k}.")
        elif isinstance(v, str):
            yield f"{prefix}{k}", v


@dataclass
class Submission:
    """One job to send: its entrypoint, its runtime environment, and the files that travel beside the code."""

    kind: str  # purify, tune, bench, fip
    entrypoint: str
    working_dir: Path
    files: dict[str, str] = field(default_factory=dict)  # name in the working dir -> text
    copies: dict[str, Path] = field(default_factory=dict)  # name in the working dir -> local file
    pip: list[str] = field(default_factory=list)
    submission_id: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def runtime_env(self, working_dir: Path | None = None) -> dict:
        """Ray's runtime_env: the code (and files) as working_dir, pip requirements if any; no env_vars."""
        env: dict = {"working_dir": str(working_dir or self.working_dir), "excludes": list(EXCLUDES)}
        if self.pip:
            env["pip"] = list(self.pip)
        return env


def new_submission_id(kind: str) -> str:
    return f"fip-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def purify_submission(cfg: JobConfig, working_dir: Path, pip: Sequence[str] = (), submission_id: str | None = None,
                      cwd: Path | None = None) -> tuple[Submission, JobConfig]:
    """The job for `fip purify` with `cfg`: connect to the cluster the job runs in (address auto),
    local paths made absolute (they must be visible to the cluster: the local stand-in, a shared
    disk; use s3:// otherwise), the MLflow run named after the submission."""
    cwd = cwd or Path.cwd()
    submission_id = submission_id or new_submission_id("purify")
    if cfg.tracking.log_to_mlflow and not cfg.tracking.tracking_uri:
        raise SubmitError("a submitted job logs to an MLflow server the cluster reaches: pass --tracking-uri "
                          "http://HOST:PORT (or set MLFLOW_TRACKING_URI), or --log-to-mlflow false")
    run = cfg.run
    cfg = cfg.replace(
        inputs={k: absolute_url(v, cwd) for k, v in vars(cfg.inputs).items()},
        run={"work_dir": absolute_url(run.work_dir, cwd), "storage_path": absolute_url(run.storage_path, cwd),
             "run_name": run.run_name or submission_id},
        resources={"address": "auto"},  # inside a Ray job: the cluster that runs it
    )
    check_no_credentials(_strings(cfg.to_dict()))
    sub = Submission("purify", f"fip purify --config {JOB_YAML}", working_dir, files={JOB_YAML: cfg.to_yaml()},
                     pip=list(pip), submission_id=submission_id,
                     metadata={"fip_command": "purify", "run_name": cfg.run.run_name})
    return sub, cfg


# flags whose value is a local file that must travel with the job (copied into the working dir)
FILE_FLAGS = ("--config", "--space-file")


def _travel_files(argv: list[str], cwd: Path) -> tuple[list[str], dict[str, Path]]:
    out, copies = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag in FILE_FLAGS and (eq or i + 1 < len(argv)):
            if not eq:
                i += 1
                value = argv[i]
            path = cwd / value
            if "://" not in value and path.is_file():
                name = f"submitted/{len(copies)}-{path.name}"
                copies[name] = path.resolve()
                value = name
            out += [flag, value]
        else:
            out.append(arg)
        i += 1
    return out, copies


def _has_flag(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def command_submission(argv: Sequence[str], working_dir: Path, *, kind: str = "fip", pip: Sequence[str] = (),
                       submission_id: str | None = None, tracking_uri: str | None = None,
                       cwd: Path | None = None) -> Submission:
    """The job for one `fip` command line (``kind`` "fip" or "tune") or a benchmark (``kind`` "bench":
    ``argv`` = NAME ARGS, run as ``python -m benchmarks.NAME ARGS``). `--config`/`--space-file` files
    travel with the code; `fip tune` connects to the cluster it runs in and gets `tracking_uri`
    unless its argv sets one."""
    argv = list(argv)
    if not argv:
        raise SubmitError("nothing to submit: give a fip command line")
    check_no_credentials((f"argument {a!r}", a) for a in argv)
    argv, copies = _travel_files(argv, cwd or Path.cwd())
    if kind == "bench":
        name = argv[0]
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name) or not (working_dir / "benchmarks" / f"{name}.py").is_file():
            known = sorted(p.stem for p in (working_dir / "benchmarks").glob("*.py") if not p.stem.startswith("_"))
            raise SubmitError(f"no benchmark {name!r} in {working_dir / 'benchmarks'}; known: {', '.join(known)}")
        entry = ["python", "-m", f"benchmarks.{name}", *argv[1:]]
    else:
        if argv[0] == "fip":
            argv = argv[1:]
        if kind == "tune":
            if not _has_flag(argv, "--address"):
                argv += ["--address", "auto"]
            if tracking_uri and not _has_flag(argv, "--tracking-uri"):
                argv += ["--tracking-uri", tracking_uri]
        entry = ["fip", *argv]
    submission_id = submission_id or new_submission_id(kind)
    return Submission(kind, shlex.join(entry), working_dir, copies=copies, pip=list(pip), submission_id=submission_id,
                      metadata={"fip_command": argv[0] if argv else kind})


def read_requirements(path: str | Path) -> list[str]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SubmitError(f"cannot read pip requirements {path}: {e.strerror or e}") from e
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def stage(sub: Submission, into: Path) -> Path:
    """A copy of the code plus the job's files, to upload as its working_dir (the checkout itself is
    shared with other work in progress and is never written to)."""
    dest = into / "working_dir"
    shutil.copytree(sub.working_dir, dest, ignore=shutil.ignore_patterns(*EXCLUDES), symlinks=False)
    for name, text in sub.files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_text(text)
    for name, src in sub.copies.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / name)
    return dest


def check_address(address: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+/?", address or ""):
        raise SubmitError(f"the jobs address must be the Ray dashboard's http(s)://HOST:PORT (8265 by default), "
                          f"got {address!r}")
    return address.rstrip("/")


def dashboard_url(address: str, job_id: str) -> str:
    return f"{address}/#/jobs/{job_id}"


class Jobs:
    """Ray's jobs API at one address (``http://HEAD:8265``), with one-line errors."""

    def __init__(self, address: str) -> None:
        self.address = check_address(address)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.exceptions import AuthenticationError
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except AuthenticationError as e:
                raise self._refused(e) from e
            except (ConnectionError, RuntimeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ConnectionError(f"cannot reach Ray's jobs API at {self.address}: {first}") from e
        return self._client

    def _refused(self, error: Exception) -> SubmitError:
        """Ray's token authentication said no: one line with Ray's reason and where the token goes (Ray's
        own message is a paragraph, and its exception class a traceback on the terminal)."""
        reason = getattr(error, "message", str(error)).strip().splitlines()[0]
        return SubmitError(f"Ray's jobs API at {self.address} refused the request ({reason}): the cluster uses "
                           f"token authentication; give this shell its token with RAY_AUTH_MODE=token and "
                           f"RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (docs/cluster.md)")

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError as e:
            raise self._refused(e) from e
        except RuntimeError as e:
            text = str(e)
            if "404" in text or "does not exist" in text:
                raise SubmitError(f"no job {args[0] if args else ''} at {self.address}") from e
            raise SubmitError(f"{what} failed at {self.address}: {text.strip().splitlines()[-1]}") from e

    def submit(self, sub: Submission) -> str:
        """Upload the code (staged with the job's files when it has any) and start the job; its id."""
        with tempfile.TemporaryDirectory(prefix="fip-submit-") as tmp:
            wd = stage(sub, Path(tmp)) if sub.files or sub.copies else sub.working_dir
            return self._call("submitting", self.client.submit_job, entrypoint=sub.entrypoint,
                              runtime_env=sub.runtime_env(wd), submission_id=sub.submission_id,
                              metadata=sub.metadata)

    def status(self, job_id: str) -> str:
        return str(self._call("status", self.client.get_job_status, job_id).value)

    def info(self, job_id: str):
        return self._call("status", self.client.get_job_info, job_id)

    def list(self) -> list:
        return sorted(self._call("listing", self.client.list_jobs), key=lambda j: j.start_time or 0)

    def logs(self, job_id: str) -> str:
        return self._call("reading logs", self.client.get_job_logs, job_id)

    def follow(self, job_id: str, write: Callable[[str], None]) -> str:
        """Stream the job's logs until it ends; its final status."""
        self.status(job_id)  # an unknown id fails here, in one line

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())
        return self.wait(job_id, TERMINAL, timeout=60.0)

    def wait(self, job_id: str, states: Iterable[str], timeout: float, poll: float = 0.2) -> str:
        """Poll until the job's status is one of `states` (or terminal); the status reached."""
        states = set(states)
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status in states or status in TERMINAL or time.monotonic() > deadline:
                return status
            time.sleep(poll)

    def stop(self, job_id: str, timeout: float = 60.0) -> str:
        """Ask Ray to stop the job (SIGTERM to its driver, then SIGKILL) and wait for it to end; the final status."""
        status = self.status(job_id)
        if status in TERMINAL:
            return status
        self._call("stopping", self.client.stop_job, job_id)
        return self.wait(job_id, TERMINAL, timeout)

