"""Local paths and ``s3://bucket/key`` URLs behind one small handle, with retries for S3.

A :class:`Storage` is bound to its :class:`StorageSettings` (endpoint, retries), so two jobs in one
process can read two different S3 endpoints. Any S3-compatible store works: AWS, MinIO, Ceph, or
moto's server in the tests. Transient S3 errors are retried with exponential backoff; the final
error names the URL.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

T = TypeVar("T")


class StorageError(OSError):
    """Reading or writing a local path or S3 object failed (after retries); names the URL."""


class NotFound(StorageError):
    """The object, bucket or file does not exist: storage answered, and said so (not a store that cannot
    be reached, which stays a plain StorageError)."""


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


@dataclass(frozen=True)
class StorageSettings:
    """Where S3 lives and how hard to retry; passed to every reader and writer, never read from the
    environment. Credentials are not settings: boto3 finds them (environment, profile, instance role)."""

    s3_endpoint: str | None = None  # None: AWS itself, or boto3's own AWS_ENDPOINT_URL
    s3_retries: int = 4
    s3_retry_delay: float = 0.2  # seconds before the first retry; doubles after each

    def __post_init__(self) -> None:
        if self.s3_retries < 1:
            raise ValueError(f"s3_retries must be >= 1, got {self.s3_retries}")
        if self.s3_retry_delay < 0:
            raise ValueError(f"s3_retry_delay must be >= 0, got {self.s3_retry_delay}")
        if self.s3_endpoint is not None and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"s3_endpoint must be an http(s):// URL, got {self.s3_endpoint!r}")


class Storage:
    """Local paths and ``s3://`` objects through one handle bound to its settings (and its own client)."""

    def __init__(self, settings: StorageSettings | None = None) -> None:
        self.settings = settings or StorageSettings()
        self._client = None

    def __getstate__(self) -> dict:  # travels to Ray workers without its client
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.settings, self._client = state["settings"], None

    def s3_client(self):
        """A boto3 S3 client for this store's endpoint (created once per handle)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.settings.s3_endpoint,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=10, read_timeout=60),
            )
        return self._client

    def with_retries(self, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        """Call `fn`, retrying transient errors with exponential backoff; the last error names `what`."""
        from botocore.exceptions import BotoCoreError, ClientError

        attempts = attempts or self.settings.s3_retries
        last: Exception | None = None
        for attempt in range(attempts):
            try:
                return fn()
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                if code in ("NoSuchKey", "404", "NoSuchBucket"):
                    raise NotFound(f"{what}: {code}") from e
                if code in ("AccessDenied", "403"):
                    raise StorageError(f"{what}: {code}") from e
                last = e
            except (BotoCoreError, OSError) as e:
                last = e
            if attempt < attempts - 1:
                time.sleep(self.settings.s3_retry_delay * 2**attempt)
        raise StorageError(f"{what}: failed after {attempts} attempts: {last}") from last

    def open_read(self, url: str) -> BinaryIO:
        """A binary stream for a local path or an S3 object (streamed, not downloaded first)."""
        url = str(url)
        if is_s3(url):
            bucket, key = split_s3(url)
            return self.with_retries(f"reading {url}", lambda: self.s3_client().get_object(Bucket=bucket, Key=key)["Body"])
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise NotFound(f"{url}: no such file")
        return open(path, "rb")

    def read_bytes(self, url: str) -> bytes:
        url = str(url)
        if is_s3(url):
            bucket, key = split_s3(url)
            return self.with_retries(f"reading {url}",
                                     lambda: self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
        with self.open_read(url) as f:
            return f.read()

    def write_bytes(self, url: str, data: bytes) -> None:
        url = str(url)
        if is_s3(url):
            bucket, key = split_s3(url)
            self.with_retries(f"writing {url}", lambda: self.s3_client().put_object(Bucket=bucket, Key=key, Body=data))
            return
        _write_local(url, lambda tmp: tmp.write_bytes(data))

    def put_file(self, url: str, path: str | Path) -> None:
        """Store the local file `path` at `url`, streamed from disk (a shard need not fit in memory);
        a local destination appears whole or not at all."""
        url = str(url)
        if is_s3(url):
            bucket, key = split_s3(url)

            def put() -> None:
                with open(path, "rb") as body:
                    self.s3_client().put_object(Bucket=bucket, Key=key, Body=body)

            self.with_retries(f"writing {url}", put)
            return
        _write_local(url, lambda tmp: shutil.copyfile(path, tmp))

    def delete(self, url: str) -> None:
        """Remove `url`; one that is not there is no error."""
        url = str(url)
        if is_s3(url):
            bucket, key = split_s3(url)
            self.with_retries(f"deleting {url}", lambda: self.s3_client().delete_object(Bucket=bucket, Key=key))
            return
        Path(url.removeprefix("file://")).unlink(missing_ok=True)

    def exists(self, url: str) -> bool:
        if is_s3(url):
            bucket, key = split_s3(url)
            try:
                self.with_retries(f"checking {url}", lambda: self.s3_client().head_object(Bucket=bucket, Key=key),
                                  attempts=2)
                return True
            except StorageError:
                return False
        return Path(str(url).removeprefix("file://")).exists()

    def fetch(self, url: str, cache_dir: str | Path) -> Path:
        """A local copy of a model or Fisher file and its JSON sidecar (S3 objects downloaded once per node)."""
        if not is_s3(url):
            return Path(url.removeprefix("file://"))
        local = Path(cache_dir) / url.removeprefix("s3://")
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(local.name + f".{os.getpid()}.part")
            tmp.write_bytes(self.read_bytes(url))
            tmp.replace(local)
            sidecar = url.rsplit(".", 1)[0] + ".json"
            if self.exists(sidecar):
                local.with_suffix(".json").write_bytes(self.read_bytes(sidecar))
        return local


def absolute_url(url: str | None, cwd: str | Path | None = None) -> str | None:
    """A local path made absolute (against `cwd`, default the current folder); URLs (``s3://``...) and None
    as they are. Work that runs elsewhere (Ray workers, Tune trials in their own folders, a cluster) must
    not resolve a relative path against its own working folder."""
    if url is None or "://" in url:
        return url
    return str((Path(cwd) if cwd is not None else Path.cwd()).joinpath(url).resolve())


def _write_local(url: str, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside the local path `url`, then move it there: whole or not at all."""
    path = Path(url.removeprefix("file://"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        tmp.replace(path)
    except OSError as e:
        raise StorageError(f"writing {url}: {e}") from e


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def register_webdataset_s3(store: Storage) -> None:
    """Let plain ``webdataset.WebDataset("s3://...")`` read through `store` (webdataset has no s3 opener).

    This edits webdataset's own opener table, so it is for scripts that use webdataset directly;
    the pipeline reads shards through :class:`Storage` and never calls it."""
    import sys

    import webdataset  # noqa: F401  (makes webdataset.gopen importable)

    gopen = sys.modules["webdataset.gopen"]

    def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192):
        if mode[0] != "r":
            raise StorageError(f"webdataset s3 opener is read-only, asked for mode {mode!r} on {url}")
        return io.BufferedReader(_RawBody(store.open_read(url)), buffer_size=max(bufsize, 1 << 16))

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
