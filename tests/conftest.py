import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)
# Ray Train's controller looks at its workers every 2 s (Ray's default), so each stage of every test job waits up
# to 2 s after its workers are done; the suite runs a hundred-odd stages. Set before any Ray starts (the session's
# and the ones `fip` processes start inherit it); a hung worker is still found by Ray's own 10-minute check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def pytest_addoption(parser):
    parser.addoption("--reliability-report", default=None, metavar="PATH",
                     help="write the reliability suite's verdicts to PATH (markdown) and PATH's .json")


@pytest.fixture
def tiny_spec():
    from fip.models import ModelSpec

    return ModelSpec("preactresnet18", num_classes=10, in_channels=1, image_size=8, width=0.0625)


@pytest.fixture
def one_thread():
    """Tiny models on one thread: the float reduction order, and so a chaotic toy run, is then the same
    whatever the machine's core count or what an earlier test set."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API on loopback (moto's server); dummy credentials in the environment, where boto3 looks."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="fip-test")
    yield url
    server.stop()


@pytest.fixture(scope="session")
def s3_store(s3_endpoint):
    """A storage handle bound to the loopback S3 endpoint."""
    from pipeline.storage import Storage, StorageSettings

    return Storage(StorageSettings(s3_endpoint=s3_endpoint))


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (2 CPUs, small object store), with the dashboard a sweep
    needs (pipeline.ray_runtime.ensure_ray: ASHA-stopped trials release their CPUs only through its State API)."""
    import ray

    from pipeline.ray_runtime import LOCAL_RAY_ENV

    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": LOCAL_RAY_ENV})  # the settings of the local Ray `fip` starts
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_lab(tmp_path_factory):
    """The committed tiny suspect (tests/digits_lab.py): a BadNets-backdoored BN-free ViT on scikit-learn
    digits (2x2 patch), with its record and D_val; the same files on every machine."""
    from digits_lab import copy_to

    return copy_to(tmp_path_factory.mktemp("digits-lab"))
