"""A Ray cluster that uses token authentication, met by a shell without its token (issue 22, class 8).

`fip jobs list` with no `--address` while a token-authenticated Ray was up showed
``ray.exceptions.AuthenticationError`` as a traceback; every jobs command now says in one line that the
cluster wants a token and where it goes. The cluster is the local stand-in (:mod:`cluster.local`) started
with `ray_auth_token`, as a cluster reachable from a network runs; the commands run as a user's shell
runs them, with a HOME of their own (so no ``~/.ray/auth_token`` is found). About 20 s in all.
"""

import os
import secrets
from pathlib import Path

import pytest
from reliability.harness import judge_error, run_process

from cluster.local import up


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("token-cluster")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    cluster = up(root, env=env, num_cpus=1, with_s3=False, dashboard_port=0, mlflow_port=0, timeout=180,
                 ray_auth_token=token, progress=lambda msg: None)
    try:
        yield cluster.ray_address, token
    finally:
        cluster.stop(progress=lambda msg: None)


def _shell(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A user's shell without Ray's token: its own HOME, no RAY_AUTH_* (plus `extra`)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    clean = {k: "" for k in os.environ if k.startswith("RAY_AUTH")}
    return {**clean, "HOME": str(home), **extra}


@pytest.mark.parametrize("command", [["list"], ["status", "raysubmit_none"], ["logs", "raysubmit_none"],
                                     ["stop", "raysubmit_none"]])
def test_jobs_without_the_token(command, token_cluster, tmp_path, verdict):
    address, _ = token_cluster
    obs = run_process(["jobs", "--address", address, *command], tmp_path, timeout=60, env=_shell(tmp_path))
    verdict("bad input", "clean error", judge_error(obs, ("token authentication", address)), obs.seconds,
            case=f"fip jobs {command[0]} on a token-authenticated cluster, no token")


def test_jobs_list_from_ray_address(token_cluster, tmp_path, verdict):
    """The issue's own case: no --address, the dashboard's URL from RAY_ADDRESS."""
    address, _ = token_cluster
    obs = run_process(["jobs", "list"], tmp_path, timeout=60, env=_shell(tmp_path, RAY_ADDRESS=address))
    verdict("bad input", "clean error", judge_error(obs, ("token authentication", "RAY_AUTH_TOKEN")), obs.seconds,
            case="fip jobs list (RAY_ADDRESS) on a token-authenticated cluster, no token")


def test_jobs_with_a_wrong_token(token_cluster, tmp_path, verdict):
    address, _ = token_cluster
    env = _shell(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    obs = run_process(["jobs", "--address", address, "list"], tmp_path, timeout=60, env=env)
    verdict("bad input", "clean error", judge_error(obs, ("token authentication", "invalid")), obs.seconds,
            case="fip jobs list on a token-authenticated cluster, wrong token")


def test_jobs_with_the_token(token_cluster, tmp_path):
    address, token = token_cluster
    env = _shell(tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    obs = run_process(["jobs", "--address", address, "list"], tmp_path, timeout=60, env=env)
    assert obs.rc == 0, obs.err
    assert "no jobs" in obs.out
