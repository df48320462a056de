"""Local paths and ``s3://bucket/key`` URLs behind one small interface, with retries for S3.

The S3 endpoint is configurable (``FIP_S3_ENDPOINT_URL`` or the standard ``AWS_ENDPOINT_URL``), so
any S3-compatible store works: AWS, MinIO, Ceph, or moto's server in the tests. Transient S3 errors
are retried with exponential backoff; the final error names the URL.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")


class StorageError(OSError):
    """Reading or writing a local path or S3 object failed (after retries); names the URL."""


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def split_s3(url: str) -> tuple[str, str]:
    if not is_s3(url):
        raise StorageError(f"not an s3:// URL: {url}")
    rest = url[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"invalid S3 bucket in {url!r}")
    return bucket, key


def endpoint_url() -> str | None:
    return os.environ.get("FIP_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


_CLIENTS: dict[str | None, object] = {}


def s3_client():
    """A boto3 S3 client for the configured endpoint (cached per process)."""
    ep = endpoint_url()
    if ep not in _CLIENTS:
        import boto3
        from botocore.config import Config

        _CLIENTS[ep] = boto3.client(
            "s3",
            endpoint_url=ep,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60),
        )
    return _CLIENTS[ep]


def with_retries(what: str, fn: Callable[[], T], attempts: int = 4, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient errors with exponential backoff; the last error names `what`."""
    from botocore.exceptions import BotoCoreError, ClientError

    last: Exception | None = None
    for attempt in range(attempts):
        try:
            return fn()
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                raise StorageError(f"{what}: {code}") from e
            last = e
        except (BotoCoreError, OSError) as e:
            last = e
        time.sleep(base_delay * 2**attempt)
    raise StorageError(f"{what}: failed after {attempts} attempts: {last}") from last


def open_read(url: str) -> BinaryIO:
    """A binary stream for a local path or an S3 object (streamed, not downloaded first)."""
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        body = with_retries(f"reading {url}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"])
        return body  # botocore StreamingBody: read(n), close()
    path = Path(url.removeprefix("file://"))
    if not path.is_file():
        raise StorageError(f"{url}: no such file")
    return open(path, "rb")


def read_bytes(url: str) -> bytes:
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        return with_retries(f"reading {url}", lambda: s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    with open_read(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    url = str(url)
    if is_s3(url):
        bucket, key = split_s3(url)
        with_retries(f"writing {url}", lambda: s3_client().put_object(Bucket=bucket, Key=key, Body=data))
        return
    path = Path(url.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def upload_file(local: str | Path, url: str) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        with_retries(f"uploading to {url}", lambda: s3_client().upload_file(str(local), bucket, key))
    else:
        write_bytes(url, Path(local).read_bytes())


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def exists(url: str) -> bool:
    if is_s3(url):
        bucket, key = split_s3(url)
        try:
            with_retries(f"checking {url}", lambda: s3_client().head_object(Bucket=bucket, Key=key), attempts=2)
            return True
        except StorageError:
            return False
    return Path(str(url).removeprefix("file://")).exists()


def register_webdataset_s3() -> None:
    """Let plain ``webdataset.WebDataset("s3://...")`` read through boto3 (webdataset has no s3 opener)."""
    import sys

    import webdataset  # noqa: F401  (makes webdataset.gopen importable)

    gopen = sys.modules["webdataset.gopen"]

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
        if mode[0] != "r":
            raise StorageError(f"webdataset s3 opener is read-only, asked for mode {mode!r} on {url}")
        return io.BufferedReader(_RawBody(open_read(url)), buffer_size=max(bufsize, 1 << 16))

    gopen.gopen_schemes["s3"] = gopen_s3


class _RawBody(io.RawIOBase):
    def __init__(self, body) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.body.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()
