"""What a shard writer's worker process runs (one shard: encode its samples, write the tar, move or
upload it), the process pool that the writer and the indexer (:mod:`pipeline.shard_index`) run their
workers in, and the progress bar both show. Light on purpose: a spawned worker imports this module
and the shard format, not torch (about 250 MB a process).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing as mp
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from pipeline.shardfmt import (
    TEXT_KEY,
    HashingWriter,
    SizeTally,
    add_sample,
    add_text_sample,
    fit_prompt,
    sniff,
)
from pipeline.storage import Storage, StorageSettings, is_s3


class UnusableSample(ValueError):
    """A source sample that cannot go into a shard; names where it is (`path`) and what is wrong (`reason`).
    The writer leaves it out and lists it in its shard's ``meta["skipped"]``."""

    def __init__(self, path: str, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"{path}: {reason}")
        self.path, self.reason = path, reason


class SourceImageError(UnusableSample):
    """A source file is not a readable image."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason, f"{path} is not a readable image: {reason}")


def decode_all(im) -> None:
    """Decode the whole image, so a truncated or corrupt source fails here, at write time and naming
    its file, and not later in a reader naming a sample key. A JPEG decodes at its smallest DCT scale:
    every byte of its entropy-coded data is still read (truncation is caught) at two thirds of the cost
    of a full decode (docs/scale.md)."""
    if im.format == "JPEG":
        im.draft(im.mode, (1, 1))
    im.load()


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _encoded(sample: tuple) -> tuple[str, bytes, tuple[int, int]]:
    """(member key, bytes, (width, height)) of one sample."""
    from PIL import Image, UnidentifiedImageError

    path, pixels = sample[3], sample[4]
    if path is None:
        return "png", _png(pixels), (int(pixels.shape[2]), int(pixels.shape[1]))
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SourceImageError(str(path), f"cannot read it ({e.strerror or e})") from e
    kind = sniff(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if kind is not None:
                size = im.size
                decode_all(im)
                return kind, data, size
            im = im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB")
            arr = np.asarray(im)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            return "png", _png(arr), im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SourceImageError(str(path), str(e)) from e


def _add_text(tar: tarfile.TarFile, key: str, index: int, text: tuple, fit: tuple[int, int | None] | None) -> None:
    """One text sample ``(prompt ids, response ids, origin)``; one whose response does not fit `fit`
    ``(max_length, bos_id)`` (:func:`pipeline.shardfmt.fit_prompt`) is unusable."""
    prompt, response, origin = text
    if fit is not None and fit_prompt(prompt, len(response), *fit) is None:
        raise UnusableSample(origin, f"its response of {len(response)} tokens and the eos do not fit max_length "
                                     f"{fit[0]}")
    add_text_sample(tar, key, prompt, response, index)


def write_shard_file(samples: list[tuple], path: Path, fit: tuple[int, int | None] | None = None) -> dict:
    """Stream `samples` ``(key, label, index, path, pixels, text)`` into a tar at `path`; count, hash, formats,
    sizes. `text` (prompt ids, response ids, origin), where not None, makes a text sample.

    A plain ustar archive in the layout of :func:`pipeline.shardfmt.add_sample`, hashed as it is written.
    A source file that is not a readable image, or a text record whose response does not fit `fit`
    ``(max_length, bos_id)``, is left out and listed in the shard's ``meta["skipped"]`` (index, where,
    reason): the rest of the set is still written, and the manifest says what is missing."""
    tally = SizeTally()
    skipped: list[dict] = []
    with open(path, "wb") as f:
        out = HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key, label, index, text = sample[0], sample[1], sample[2], sample[5]
                try:
                    if text is not None:
                        _add_text(tar, key, index, text, fit)
                        tally.add(TEXT_KEY, None)
                        continue
                    kind, data, size = _encoded(sample)
                except UnusableSample as e:
                    skipped.append({"index": int(index), "path": e.path, "reason": e.reason})
                    continue
                add_sample(tar, key, kind, data, label, index)
                tally.add(kind, size)
    meta = tally.meta()
    if skipped:
        meta["skipped"] = skipped
    return {"count": len(samples) - len(skipped), "sha256": out.sha.hexdigest(), "bytes": out.size, "meta": meta}


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (Linux ``VmHWM``: unlike ``ru_maxrss`` it is not inherited
    from the parent a spawned worker was forked from); None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def write_shard_task(task: dict, settings: StorageSettings) -> dict:
    """Worker entry point: one shard, written to a temporary file and then moved (local) or uploaded
    (S3), so a shard at its final name is always whole."""
    url = task["url"]
    if not is_s3(url):
        final = Path(url.removeprefix("file://"))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        try:
            info = write_shard_file(task["samples"], tmp, task.get("fit"))
            if info["count"]:  # a shard whose every source was unreadable is not written (a reader refuses it)
                tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        fd, name = tempfile.mkstemp(suffix=".tar", dir=task.get("tmp_dir"))
        os.close(fd)
        tmp = Path(name)
        try:
            info = write_shard_file(task["samples"], tmp, task.get("fit"))
            if info["count"]:
                Storage(settings).put_file(url, tmp)
        finally:
            tmp.unlink(missing_ok=True)
    return {**info, "worker_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------- processes and progress
class _Inline:
    """The executor interface, in this process (``workers <= 1``: no start-up cost, easy to debug)."""

    def submit(self, fn, *args) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 (delivered through the future, as a pool would)
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def process_pool(workers: int) -> cf.Executor | _Inline:
    """`workers` spawned processes, or this process itself for one."""
    if workers <= 1:
        return _Inline()
    # spawn: fresh interpreters that import only this light module (no torch), with this process's
    # current environment (S3 credentials). Not fork: this process may run threads (torch's, boto3's,
    # a test's S3 server); not forkserver: its children keep the environment of the server's start.
    ctx = mp.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, **kwargs):
    """A tqdm bar on the terminal when `enabled`; else one that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)
