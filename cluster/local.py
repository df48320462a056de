"""The local stand-in for a cluster: a Ray head with its dashboard (the jobs API), an MLflow tracking
server and an S3 API (moto), all bound to 127.0.0.1 and left running in the background.

``python -m cluster.local up`` (``make cluster-up``) starts them, waits until each answers, prints
the addresses and writes them to ``runs/cluster/addresses.env``; ``python -m cluster.local down``
(``make cluster-down``) stops exactly the processes it started, by the ids recorded in
``runs/cluster/state.json``, never by name, so other Ray clusters on the machine are left alone.

Credentials are the environment of whoever runs ``up``: the Ray head and so every job and worker
inherit it, exactly as a real cluster holds its own (docs/cluster.md). ``fip submit`` never sends
any. Ray's token authentication is switched off (``RAY_AUTH_MODE=disabled``) because every port
listens on loopback only; a remote cluster keeps tokens on.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ROOT = "runs/cluster"
HOST = "127.0.0.1"
# moto accepts any key; these are used only when whoever starts the stand-in has no AWS keys at all
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "fip-local", "AWS_SECRET_ACCESS_KEY": "fip-local"}


class ClusterError(OSError):
    """The stand-in could not start or stop; the message names the service and its log."""


def free_port(preferred: int | None = None) -> int:
    """`preferred` when nothing listens there, else a port the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise ClusterError("no free port on 127.0.0.1")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the pid, its identity.
    None when no such process runs (a zombie is reaped if it is our child, and counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return None
    return int(fields[19])


def _session_members(sid: int) -> list[int]:
    """Every live process in session `sid` (the services are started as session leaders)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


@dataclass
class Service:
    name: str
    pid: int
    start_ticks: int | None
    url: str
    log: str

    def alive(self) -> bool:
        return self.start_ticks is not None and _start_ticks(self.pid) == self.start_ticks


@dataclass
class LocalCluster:
    """What :func:`up` started: the addresses a submitter needs and the processes to stop."""

    root: str
    ray_address: str  # the dashboard: Ray's jobs API, what `fip submit --address` takes
    gcs_address: str
    tracking_uri: str
    s3_endpoint: str | None
    ray_temp_dir: str
    services: list[Service] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return Path(self.root) / "state.json"

    @property
    def env_path(self) -> Path:
        return Path(self.root) / "addresses.env"

    def addresses(self) -> dict[str, str]:
        """The non-secret settings a submitter's shell needs (RAY_ADDRESS and MLFLOW_TRACKING_URI are
        read by the `fip` command; the S3 endpoint goes to --s3-endpoint)."""
        out = {"RAY_ADDRESS": self.ray_address, "MLFLOW_TRACKING_URI": self.tracking_uri,
               "FIP_RAY_GCS_ADDRESS": self.gcs_address, "FIP_RAY_TEMP_DIR": self.ray_temp_dir}
        if self.s3_endpoint:
            out["FIP_S3_ENDPOINT_URL"] = self.s3_endpoint
        return out

    def save(self) -> None:
        self.state_path.write_text(json.dumps(asdict(self), indent=2))
        self.env_path.write_text("".join(f"{k}={v}\n" for k, v in self.addresses().items()))

    @classmethod
    def load(cls, root: str | Path) -> LocalCluster | None:
        path = Path(root) / "state.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        data["services"] = [Service(**s) for s in data["services"]]
        return cls(**data)

    def running(self) -> list[str]:
        return [s.name for s in self.services if s.alive()]

    def stop(self, progress=print) -> None:
        """Stop each service, newest first: SIGTERM to the leader we started (Ray drains and shuts its
        own processes down), then SIGKILL to whatever is left in its session."""
        for svc in reversed(self.services):
            _stop_service(svc, grace=45.0 if svc.name == "ray" else 10.0)
            progress(f"stopped {svc.name} (pid {svc.pid})")
        for path in (self.state_path, self.env_path):
            path.unlink(missing_ok=True)


def _stop_service(svc: Service, grace: float) -> None:
    if svc.start_ticks is None:
        return
    if not svc.alive() and _start_ticks(svc.pid) is not None:
        return  # the pid now belongs to another process: ours ended long ago
    if svc.alive():
        try:
            os.kill(svc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and svc.alive():
            time.sleep(0.2)
    # The leader is gone or ignored SIGTERM; its session may still hold workers or children. While
    # any process is in a session, the kernel does not reuse its id: what is left there is ours.
    for _ in range(50):
        left = _session_members(svc.pid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    raise ClusterError(f"{svc.name}: processes {_session_members(svc.pid)} survived SIGKILL")


def _spawn(name: str, cmd: list[str], env: Mapping[str, str], log_dir: Path, url: str) -> Service:
    log = log_dir / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=dict(env), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    return Service(name, proc.pid, _start_ticks(proc.pid), url, str(log))


def _wait_http(svc: Service, path: str, deadline: float, token: str | None = None) -> None:
    """Until `svc` answers 200 on `path` (sending `token` as Ray's bearer token); a dead process or the
    deadline ends in its log's last line."""
    url = svc.url + path
    headers = {"authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if not svc.alive():
            break
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    tail = ""
    try:
        lines = [ln for ln in Path(svc.log).read_text(errors="replace").splitlines() if ln.strip()]
        tail = lines[-1] if lines else ""
    except OSError:
        pass
    state = "exited" if not svc.alive() else "did not answer in time"
    raise ClusterError(f"{svc.name} {state} ({url}); its log {svc.log} ends: {tail}")


def up(root: str | Path = DEFAULT_ROOT, *, env: Mapping[str, str], num_cpus: int = 2, with_s3: bool = True,
       ray_temp_dir: str | Path | None = None, dashboard_port: int = 8265, mlflow_port: int = 5001,
       s3_port: int = 5002, object_store_mb: int = 256, timeout: float = 120.0, ray_auth_token: str | None = None,
       progress=print) -> LocalCluster:
    """Start the stand-in and return its addresses; `env` is the environment the services (and so the
    jobs) get, credentials included. Ports are the preferred ones when free, else any free port.
    `ray_auth_token` starts Ray with token authentication, as a cluster reachable from a network runs
    (docs/cluster.md); by default it is off, every port being on loopback."""
    root = Path(root).resolve()
    existing = LocalCluster.load(root)
    if existing is not None and existing.running():
        raise ClusterError(f"a local cluster is already up under {root} ({', '.join(existing.running())}); "
                           f"stop it first (python -m cluster.local down)")
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under its temp dir and must stay under ~107 characters: keep it short
    temp = Path(ray_temp_dir) if ray_temp_dir else Path(tempfile.mkdtemp(prefix="fip-ray-", dir="/tmp"))
    bin_dir = str(Path(sys.executable).parent)
    base = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    base["PATH"] = bin_dir + os.pathsep + base.get("PATH", "")  # jobs' `fip` is this environment's
    if with_s3 and not base.get("AWS_ACCESS_KEY_ID"):
        base.update(MOTO_KEYS)
    base.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    ray_env = {**base, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if ray_auth_token:
        ray_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_auth_token})

    cluster = LocalCluster(str(root), "", "", "", None, str(temp))
    deadline = time.monotonic() + timeout
    try:
        waits = []
        if with_s3:
            port = free_port(s3_port)
            svc = _spawn("s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)], base, logs,
                         f"http://{HOST}:{port}")
            cluster.services.append(svc)
            cluster.s3_endpoint = svc.url
            waits.append((svc, "/moto-api/"))
        port = free_port(mlflow_port)
        svc = _spawn("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
                                "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                                "--artifacts-destination", str(root / "mlartifacts")], base, logs,
                     f"http://{HOST}:{port}")
        cluster.services.append(svc)
        cluster.tracking_uri = svc.url
        waits.append((svc, "/health"))
        dash, gcs = free_port(dashboard_port), free_port(6379)
        ports = {f"--{name}": free_port() for name in (
            "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}
        cmd = [str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
               f"--node-ip-address={HOST}", f"--port={gcs}", "--include-dashboard=true",
               f"--dashboard-host={HOST}", f"--dashboard-port={dash}", f"--temp-dir={temp}",
               f"--object-store-memory={object_store_mb * 1024**2}", "--disable-usage-stats",
               *(f"{k}={v}" for k, v in ports.items())]
        svc = _spawn("ray", cmd, ray_env, logs, f"http://{HOST}:{dash}")
        cluster.services.append(svc)
        cluster.ray_address, cluster.gcs_address = svc.url, f"{HOST}:{gcs}"
        waits.append((svc, "/api/jobs/"))  # the jobs API answers once the head's job agent is up
        cluster.save()
        for svc, path in waits:
            _wait_http(svc, path, deadline, ray_auth_token if svc.name == "ray" else None)
    except BaseException:
        cluster.stop(progress=lambda msg: None)
        raise
    progress(f"local cluster up under {root} (logs in {logs}, Ray's in {temp})")
    for k, v in cluster.addresses().items():
        progress(f"  {k}={v}")
    progress(f"addresses written to {cluster.env_path}: `set -a; . {cluster.env_path}; set +a`")
    return cluster


def down(root: str | Path = DEFAULT_ROOT, progress=print) -> bool:
    """Stop the stand-in recorded under `root`; False when none was recorded."""
    cluster = LocalCluster.load(Path(root).resolve())
    if cluster is None:
        progress(f"no local cluster recorded under {Path(root).resolve()}")
        return False
    cluster.stop(progress)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--root", default=DEFAULT_ROOT, help="state, logs, the MLflow store and artifacts (default: %(default)s)")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--no-s3", action="store_true", help="do not start the S3 stand-in")
    p.add_argument("--ray-temp-dir", default=None, help="Ray's --temp-dir (default: a new /tmp/fip-ray-* folder)")
    args = p.parse_args(argv)
    try:
        if args.action == "up":
            # the environment of whoever starts the stand-in is the cluster's, credentials included
            up(args.root, env=os.environ, num_cpus=args.num_cpus, with_s3=not args.no_s3,
               ray_temp_dir=args.ray_temp_dir)
        elif args.action == "down":
            down(args.root)
        else:
            cluster = LocalCluster.load(Path(args.root).resolve())
            if cluster is None or not cluster.running():
                print("no local cluster running")
                return 1
            print(f"running: {', '.join(cluster.running())}")
            for k, v in cluster.addresses().items():
                print(f"  {k}={v}")
    except (ClusterError, OSError) as e:
        print(f"cluster.local {args.action}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
