"""Streaming, parallel, resumable shard writing, and indexes for shards written by other tools.

A *source* yields its samples in *groups* that are small whatever the data set's size: one class
folder of an image folder (ImageNet: about 1,300 file names, images unread), one CIFAR-10 batch
file, or one in-memory lab set. The writer cuts the stream into shards of ``maxcount`` samples and
hands each shard to a worker process; at most ``2 * workers`` shards are queued or being written,
so what the writer holds is bounded by ``maxcount * (2 * workers + outputs)`` samples, not by the
data set (:attr:`WriteStats.peak_buffered` reports it). A worker streams its shard into a temporary
tar on disk, one sample at a time, hashing as it writes: a source JPEG, PNG or WebP goes in byte for
byte, anything else (PPM, BMP, raw arrays) as lossless PNG.

Why a process pool and not Ray Data: writing shards is one pass of file reads and tar appends with
no shuffle, join or repartition, which is what Ray Data adds; a pool needs no cluster (no Ray
start, no shared lock with the jobs), keeps the shard <-> sample assignment a pure function of the
listing order (which is what makes resuming exact), and saturates the disk or network of one
machine with a few processes. Several machines would each take a range of classes.

The defender's clean set D_val is chosen while streaming: a seeded share of each class within
each group (:class:`DvalSplit`); D_val goes to one destination and, optionally, the rest to another,
in the same pass.

Resume: each finished shard is recorded (name, count, SHA-256, a digest of the samples that went
in) in ``manifest.partial.json``. A rerun with the same plan re-lists the source, keeps each shard
whose recorded digest matches and writes only the others; ``manifest.json`` appears only when
every shard is written, so a reader never sees a half-written set.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.storage import NotFound, Storage, StorageError, StorageSettings, is_s3, join, split_s3

if TYPE_CHECKING:
    from lab.datasets import ImageSet
    from pipeline.shards import ShardInfo, ShardManifest

MAX_SIZES = 4  # distinct image sizes remembered per shard (more: the shard is "varied")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may carry, in preference order
DEFAULT_IMAGE_SIZE = 224


class SourceImageError(ValueError):
    """A source file is not a readable image; names the file."""


class MalformedSample(ValueError):
    """A shard's sample lacks an image or a label; names the shard and the key."""


# ---------------------------------------------------------------- sources
@dataclass
class Sample:
    """One sample on its way into a shard: a source file stored as it is, or raw pixels stored as PNG."""

    index: int
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None  # uint8 (C, H, W)

    def digest_part(self, root: str) -> bytes:
        if self.path is not None:
            rel = os.path.relpath(self.path, root) if root else self.path
            return f"{self.index}:{self.label}:{rel}:{os.path.getsize(self.path)};".encode()
        return f"{self.index}:{self.label}:".encode() + hashlib.sha256(np.ascontiguousarray(self.pixels)).digest()


@dataclass
class Source:
    """A data set as groups of samples, plus what its manifest needs to say about it."""

    name: str
    split: str
    classes: list[str]
    channels: int
    groups: Callable[[], Iterator[tuple[str, list[Sample]]]]  # (group id, samples), in a fixed order
    fixed_shape: list[int] | None = None  # raw arrays: (C, H, W); files: learned from the stored images
    image_size: int | None = None  # files: resize target when stored sizes vary (None: 224)
    root: str = ""
    describe: dict = field(default_factory=dict)  # identifies the source in the resume plan


def folder_source(root: str | Path, split: str = "train", image_size: int | None = None, channels: int = 3,
                  name: str = "") -> Source:
    """An ImageNet-layout folder (``root/<split>/<class>/<image>``), streamed one class at a time."""
    from lab.datasets import image_folder_classes, iter_image_folder

    base, classes = image_folder_classes(root, split)

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        index = 0
        for group in iter_image_folder(root, split):
            samples = [Sample(index + k, group.label, path=str(f)) for k, f in enumerate(group.files)]
            index += len(samples)
            yield group.name, samples

    return Source(name or f"{Path(root).name}", split, classes, channels, groups, image_size=image_size,
                  root=str(base.resolve()), describe={"kind": "image-folder", "root": str(base.resolve())})


def cifar10_source(root: str | Path, split: str = "train") -> Source:
    """The ``cifar-10-batches-py`` folder, one 10,000-image batch file at a time."""
    from lab.datasets import CIFAR10_CLASSES, DatasetError, _load_cifar_batch

    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise DatasetError(f"no {names[0]} under {root}: expected the cifar-10-batches-py layout")

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        index = 0
        for f in files:
            batch = _load_cifar_batch(f)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DatasetError(f"{f}: 'data' should be (N, 3072) uint8, got {data.shape}")
            pixels = data.reshape(-1, 3, 32, 32)
            labels = np.asarray(batch["labels"], dtype=np.int64)
            yield f.name, [Sample(index + k, int(labels[k]), pixels=pixels[k]) for k in range(len(labels))]
            index += len(labels)

    return Source("cifar10", split, list(CIFAR10_CLASSES), 3, groups, fixed_shape=[3, 32, 32],
                  describe={"kind": "cifar10", "root": str(root.resolve()), "split": split})


def imageset_source(data: ImageSet, indices: Iterable[int] | None = None, name: str = "", split: str = "") -> Source:
    """An in-memory lab set (one group); `indices` are the samples' indices in their source split."""
    idx = np.arange(len(data)) if indices is None else np.asarray(list(indices) if not isinstance(indices, np.ndarray)
                                                                      else indices)
    x, y = data.x.numpy(), data.y.numpy()

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        yield "all", [Sample(int(idx[r]), int(y[r]), pixels=x[r]) for r in range(len(y))]

    digest = hashlib.sha256(np.ascontiguousarray(x)).hexdigest()[:16]
    return Source(name or data.name, split, list(data.classes), int(data.shape[0]), groups,
                  fixed_shape=list(data.shape), describe={"kind": "arrays", "name": name or data.name,
                                                          "pixels_sha256_16": digest})


def dataset_source(name: str, split: str = "train", root: str | Path | None = None,
                   image_size: int | None = None) -> Source:
    """The streaming source for a ``fip shard`` data set name: image folders and CIFAR-10 stream;
    the lab's small sets are read into memory first."""
    from lab.datasets import dataset_info, load_dataset

    dataset_info(name)  # an unknown name fails here, naming the known ones
    if name == "imagenet-folder":
        if root is None:
            raise ValueError("imagenet-folder needs --root (the folder holding train/ and val/)")
        return folder_source(root, split, image_size, 3)
    if name == "cifar10" and root is not None:
        folder = Path(root)
        if any((folder / n).is_file() for n in ("data_batch_1", "test_batch")):
            return cifar10_source(folder, split)
        return folder_source(folder, split, image_size, 3, name="cifar10")  # CIFAR-10 as PNG files per class
    data = load_dataset(name, split, root)
    return imageset_source(data, None, name, split)


# ---------------------------------------------------------------- D_val while streaming
@dataclass(frozen=True)
class DvalSplit:
    """The defender's clean set: `fraction` of each class within each source group (at least one),
    chosen with a generator seeded by (seed, group, class), so it does not depend on the workers."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"D_val fraction must be in (0, 1), got {self.fraction}")

    def choose(self, group: str, samples: list[Sample]) -> set[int]:
        """Positions in `samples` that go to D_val."""
        from fip.training import derive_seed

        labels = np.array([s.label for s in samples], dtype=np.int64)
        chosen: set[int] = set()
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = min(len(members), max(1, int(round(self.fraction * len(members)))))
            rng = np.random.default_rng(derive_seed(self.seed, "dval", group, int(c)))
            chosen.update(int(i) for i in rng.choice(members, k, replace=False))
        return chosen


# ---------------------------------------------------------------- the worker's side (no torch here)
def _sniff(data: bytes) -> str | None:
    """The container of encoded image bytes that shards keep as they are."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _encoded(sample: tuple) -> tuple[str, bytes, tuple[int, int]]:
    """(member key, bytes, (width, height)) of one sample."""
    from PIL import Image, UnidentifiedImageError

    _, _, _, path, pixels = sample
    if path is None:
        return "png", _png(pixels), (int(pixels.shape[2]), int(pixels.shape[1]))
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SourceImageError(f"cannot read {path}: {e}") from e
    kind = _sniff(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if kind is not None:
                return kind, data, im.size
            im = im.convert("L" if im.mode in ("1", "L", "I;16") else "RGB")
            arr = np.asarray(im)
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            return "png", _png(arr), im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SourceImageError(f"{path} is not a readable image: {e}") from e


def iter_tar_samples(stream) -> Iterator[dict]:
    """A tar stream's members grouped into samples as WebDataset groups them: the key is a member's
    path up to the first dot of its file name, the extension (lower-cased) names the field, and
    consecutive members sharing a key form one sample. Names starting with ``__`` are metadata.

    Plain ``tarfile`` (webdataset's own iterator imports torch: a second in every worker)."""
    import tarfile

    current: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            folder, _, fname = info.name.rpartition("/")
            stem, dot, ext = fname.partition(".")
            if info.isreg() and dot and stem and not fname.startswith("__"):
                key = f"{folder}/{stem}" if folder else stem
                data = tar.extractfile(info).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                ext = ext.lower()
                if ext in current:
                    raise ValueError(f"{info.name}: a second {ext!r} member for key {key!r}")
                current[ext] = data
            tar.members = []  # a stream of any length: keep no member list
    if current is not None:
        yield current


def parse_sample(sample: dict, url: str) -> tuple[str, bytes, int, int | None]:
    """(key, image bytes, label, source index or None) of one grouped sample."""
    key = sample.get("__key__")
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise MalformedSample(f"shard {url}: sample {key!r} is malformed (no image under {', '.join(IMAGE_KEYS)}; "
                              f"members: {', '.join(k for k in sample if not k.startswith('__'))})")
    try:
        label = int(sample["cls"].strip())
        index = int(sample["idx"]) if "idx" in sample else None
    except (KeyError, ValueError) as e:
        raise MalformedSample(f"shard {url}: sample {key!r} is malformed (label or index: {e!r})") from e
    return key, image, label, index


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (the shard's SHA-256 without a re-read)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


def write_shard_file(samples: list[tuple], path: Path) -> dict:
    """Stream `samples` ``(key, label, index, path, pixels)`` into a tar at `path`; count, hash, formats, sizes.

    A plain ustar archive with fixed owner, mode and time (the same samples give the same bytes),
    members ``<key>.<jpg|png|webp>``, ``<key>.cls``, ``<key>.idx``: what WebDataset's own writer makes
    (not used here: importing webdataset imports torch, a second of start-up in every worker)."""
    import tarfile

    formats: dict[str, int] = {}
    sizes: list[list[int]] = []
    varied = False
    with open(path, "wb") as f:
        out = _HashingWriter(f)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key, label, index = sample[0], sample[1], sample[2]
                kind, data, size = _encoded(sample)
                for ext, payload in ((kind, data), ("cls", str(label).encode()), ("idx", str(index).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(payload), 0o444, 0
                    tar.addfile(info, io.BytesIO(payload))
                formats[kind] = formats.get(kind, 0) + 1
                if list(size) not in sizes:
                    if len(sizes) < MAX_SIZES:
                        sizes.append(list(size))
                    else:
                        varied = True
    return {"count": len(samples), "sha256": out.sha.hexdigest(), "bytes": out.size,
            "meta": {"formats": formats, "sizes": sizes, "varied": varied}}


def _put_file(store: Storage, url: str, path: Path) -> None:
    bucket, key = split_s3(url)

    def put() -> None:
        with open(path, "rb") as body:
            store.s3_client().put_object(Bucket=bucket, Key=key, Body=body)

    store.with_retries(f"writing {url}", put)


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
            info = write_shard_file(task["samples"], tmp)
            tmp.replace(final)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        fd, name = tempfile.mkstemp(suffix=".tar", dir=task.get("tmp_dir"))
        os.close(fd)
        tmp = Path(name)
        try:
            info = write_shard_file(task["samples"], tmp)
            _put_file(Storage(settings), url, tmp)
        finally:
            tmp.unlink(missing_ok=True)
    return {**info, "worker_rss_mb": peak_rss_mb()}


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


def _executor(workers: int):
    if workers <= 1:
        return _Inline()
    # spawn: fresh interpreters that import only this light module (no torch), with this process's
    # current environment (S3 credentials). Not fork: this process may run threads (torch's, boto3's,
    # a test's S3 server); not forkserver: its children keep the environment of the server's start.
    ctx = mp.get_context("spawn")
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


# ---------------------------------------------------------------- the writer
@dataclass
class WriteStats:
    shards_written: int = 0
    shards_reused: int = 0  # already complete from an earlier, interrupted or finished, write
    samples: int = 0
    bytes_written: int = 0
    peak_buffered: int = 0  # samples the writer held at once: open shards + queued and in-flight shards
    peak_worker_rss_mb: float | None = None  # the largest peak resident memory of a writing process
    seconds: float = 0.0


@dataclass
class WriteResult:
    manifests: dict[str, ShardManifest]
    stats: WriteStats


class _Output:
    """One destination: its open shard, its finished shards, and what a resume may reuse."""

    def __init__(self, dest: str, plan: dict, store: Storage, overwrite: bool) -> None:
        from pipeline.shards import MANIFEST, PARTIAL_MANIFEST, ShardError, ShardInfo, ShardManifest

        self.dest, self.plan, self.store = dest.rstrip("/"), plan, store
        self.partial_url, self.final_url = join(self.dest, PARTIAL_MANIFEST), join(self.dest, MANIFEST)
        self.buffer: list[Sample] = []
        self.number = 0
        self.count = 0
        self.done: dict[int, ShardInfo] = {}
        self.reusable: dict[str, ShardInfo] = {}
        self.indices_sha = hashlib.sha256()
        self.last_saved = 0.0
        previous, where = None, None
        for url in (self.partial_url, self.final_url):
            try:
                raw = json.loads(store.read_bytes(url))
            except NotFound:  # a store that cannot be reached is an error, not "nothing written yet"
                continue
            except json.JSONDecodeError as e:
                raise ShardError(f"{url} is not a shard manifest: {e}") from e
            previous, where = raw, url
            break
        if previous is not None:
            old_plan = previous.get("plan") or previous.get("meta", {}).get("plan")
            if old_plan == plan:
                self.reusable = {s["name"]: ShardInfo(**s) for s in previous["shards"]}
            elif not overwrite:
                raise ShardError(f"{self.dest} already holds shards of another write (see {where}); pass "
                                 f"--overwrite to replace them or choose another destination")
        if store.exists(self.final_url):
            # from here on the set is being rewritten: keep what may be reused where a resume finds it
            self.save_partial(force=True)
            _delete(store, self.final_url)
        self._manifest_cls = ShardManifest

    def shard_name(self) -> str:
        return self.shard_name_for(self.number)

    @staticmethod
    def shard_name_for(number: int) -> str:
        from pipeline.shards import SHARD_NAME

        return SHARD_NAME.format(number)

    def save_partial(self, force: bool = False, every: float = 0.0) -> None:
        now = time.monotonic()
        if not force and now - self.last_saved < every:
            return
        shards = [asdict(self.done[n]) for n in sorted(self.done)]
        if not self.done:
            shards = [asdict(s) for s in self.reusable.values()]
        self.store.write_bytes(self.partial_url, json.dumps({"plan": self.plan, "shards": shards}, indent=1).encode())
        self.last_saved = now

    def finish(self, source: Source, meta: dict) -> ShardManifest:
        from pipeline.shards import ShardError

        if not self.done:
            raise ShardError(f"no samples went to {self.dest}: nothing to write")
        infos = [self.done[n] for n in sorted(self.done)]
        formats: dict[str, int] = {}
        sizes: list[list[int]] = []
        varied = False
        for info in infos:
            for k, v in info.meta.get("formats", {}).items():
                formats[k] = formats.get(k, 0) + v
            varied = varied or info.meta.get("varied", False)
            sizes += [s for s in info.meta.get("sizes", []) if s not in sizes]
        if source.fixed_shape is not None:
            shape, variable = list(source.fixed_shape), False
        elif len(sizes) == 1 and not varied and source.image_size is None:
            shape, variable = [source.channels, sizes[0][1], sizes[0][0]], False
        else:
            size = source.image_size or DEFAULT_IMAGE_SIZE
            shape, variable = [source.channels, size, size], True
        manifest = self._manifest_cls(
            source.name, source.split, list(source.classes), shape, sum(i.count for i in infos), infos,
            {"indices_sha256_16": self.indices_sha.hexdigest()[:16], "variable_size": variable, "formats": formats,
             "stored_sizes": sizes[:MAX_SIZES], "plan": self.plan, **meta})
        self.store.write_bytes(self.final_url, manifest.to_json().encode())
        _delete(self.store, self.partial_url)
        return manifest


def _delete(store: Storage, url: str) -> None:
    if is_s3(url):
        bucket, key = split_s3(url)
        store.with_retries(f"deleting {url}", lambda: store.s3_client().delete_object(Bucket=bucket, Key=key))
    else:
        Path(url.removeprefix("file://")).unlink(missing_ok=True)


def write_source(
    source: Source,
    dest: str,
    *,
    maxcount: int = 1000,
    workers: int = 1,
    store: Storage | None = None,
    dval: DvalSplit | None = None,
    rest: str | None = None,
    indices: Iterable[int] | None = None,
    limit: int | None = None,
    meta: dict | None = None,
    progress: bool = False,
    overwrite: bool = False,
    queue: int | None = None,
    save_every: float = 2.0,
    tmp_dir: str | None = None,
) -> WriteResult:
    """Write `source` as shards of at most `maxcount` samples to `dest` (a folder or s3:// prefix).

    With `dval`, `dest` receives D_val and `rest` (optional) everything else, in one pass.
    `indices` keeps only those source indices; `limit` stops after that many samples. `workers`
    processes write shards; at most `queue` (default ``2 * workers``) are pending at once. An earlier
    write of the same plan at `dest` is resumed; one of another plan is refused unless `overwrite`.
    """
    from pipeline.shards import ShardError, ShardInfo

    if maxcount < 1:
        raise ShardError(f"maxcount must be >= 1, got {maxcount}")
    if workers < 1:
        raise ShardError(f"workers must be >= 1, got {workers}")
    if rest is not None and dval is None:
        raise ShardError("a destination for the rest needs a D_val split (dval fraction)")
    store = store or Storage()
    queue = queue or 2 * workers
    keep = None if indices is None else {int(i) for i in indices}
    plan = {"source": source.describe, "split": source.split, "maxcount": maxcount, "limit": limit,
            "indices_sha256_16": None if keep is None else hashlib.sha256(
                np.array(sorted(keep), dtype=np.int64).tobytes()).hexdigest()[:16],
            "dval": None if dval is None else asdict(dval), "image_size": source.image_size}
    outputs = {dest: _Output(dest, {**plan, "role": "dval" if dval else "all"}, store, overwrite)}
    if rest is not None:
        if rest.rstrip("/") == dest.rstrip("/"):
            raise ShardError(f"D_val and the rest cannot share the destination {dest}")
        outputs[rest] = _Output(rest, {**plan, "role": "rest"}, store, overwrite)
    stats = WriteStats()
    started = time.perf_counter()
    pending: dict[cf.Future, tuple[_Output, int, str, int]] = {}
    in_flight = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"shards -> {dest}", unit="img")

    def held() -> int:
        return in_flight + sum(len(o.buffer) for o in outputs.values())

    def collect(fut: cf.Future) -> None:
        nonlocal in_flight
        out, number, digest, n = pending.pop(fut)
        in_flight -= n
        info = fut.result()
        out.done[number] = ShardInfo(out.shard_name_for(number), info["count"], info["sha256"], digest, info["meta"])
        stats.shards_written += 1
        stats.bytes_written += info["bytes"]
        if info.get("worker_rss_mb") is not None:
            stats.peak_worker_rss_mb = max(stats.peak_worker_rss_mb or 0.0, info["worker_rss_mb"])
        if bar is not None:
            bar.update(n)
        out.save_partial(every=save_every)

    def flush(out: _Output) -> None:
        nonlocal in_flight
        if not out.buffer:
            return
        samples, out.buffer = out.buffer, []
        h = hashlib.sha256()
        for s in samples:
            h.update(s.digest_part(source.root))
        digest = h.hexdigest()
        name = out.shard_name()
        old = out.reusable.get(name)
        if old is not None and old.source_digest == digest and store.exists(join(out.dest, name)):
            out.done[out.number] = old
            stats.shards_reused += 1
            if bar is not None:
                bar.update(len(samples))
        else:
            while len(pending) >= queue:
                collect(next(cf.as_completed(pending)))
            task = {"url": join(out.dest, name), "tmp_dir": tmp_dir,
                    "samples": [(f"{s.index:09d}", s.label, s.index, s.path, s.pixels) for s in samples]}
            pending[pool.submit(write_shard_task, task, store.settings)] = (out, out.number, digest, len(samples))
            in_flight += len(samples)
            stats.peak_buffered = max(stats.peak_buffered, held())
        out.number += 1

    pool = _executor(workers)
    try:
        for group, samples in _limited(source.groups(), keep, limit):
            chosen = dval.choose(group, samples) if dval is not None else None
            for pos, s in enumerate(samples):
                if chosen is None:
                    out = outputs[dest]
                elif pos in chosen:
                    out = outputs[dest]
                elif rest is not None:
                    out = outputs[rest]
                else:
                    continue
                out.buffer.append(s)
                out.count += 1
                out.indices_sha.update(np.int64(s.index).tobytes())
                stats.samples += 1
                stats.peak_buffered = max(stats.peak_buffered, held())
                if len(out.buffer) >= maxcount:
                    flush(out)
        for out in outputs.values():
            flush(out)
        while pending:
            collect(next(cf.as_completed(pending)))
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in [f for f in list(pending) if f.done() and not f.cancelled() and f.exception() is None]:
            collect(fut)
        for out in outputs.values():
            out.save_partial(force=True)
        raise
    finally:
        pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    manifests = {}
    for url, out in outputs.items():
        extra = dict(meta or {})
        if dval is not None:
            extra["dval"] = {**asdict(dval), "role": out.plan["role"], "count": out.count}
        manifests[url] = out.finish(source, extra)
    stats.seconds = time.perf_counter() - started
    return WriteResult(manifests, stats)


def _limited(groups: Iterator[tuple[str, list[Sample]]], keep: set[int] | None,
             limit: int | None) -> Iterator[tuple[str, list[Sample]]]:
    """The source's groups with only the `keep` indices, stopping after `limit` samples."""
    taken = 0
    for group, samples in groups:
        if keep is not None:
            samples = [s for s in samples if s.index in keep]
        if limit is not None:
            samples = samples[: max(limit - taken, 0)]
        if samples:
            taken += len(samples)
            yield group, samples
        if limit is not None and taken >= limit:
            return


# ---------------------------------------------------------------- indexing shards made elsewhere
def index_shard_task(url: str, settings: StorageSettings) -> dict:
    """Worker entry point: one shard read through once: sample count, SHA-256, labels, formats, sizes."""
    import tarfile

    from PIL import Image

    count, lo, hi = 0, None, None
    formats: dict[str, int] = {}
    sizes: list[list[int]] = []
    varied = False
    sha = hashlib.sha256()
    stream = HashedStream(Storage(settings).open_read(url), sha)
    try:
        for sample in iter_tar_samples(stream):
            key, image, label, _ = parse_sample(sample, url)
            count += 1
            lo = label if lo is None else min(lo, label)
            hi = label if hi is None else max(hi, label)
            kind = _sniff(image) or "other"
            formats[kind] = formats.get(kind, 0) + 1
            try:
                with Image.open(io.BytesIO(image)) as im:
                    size = list(im.size)
            except Exception as e:  # noqa: BLE001 (any decoder error: named with the sample)
                raise SourceImageError(f"shard {url}: sample {key!r} is not a readable image ({e})") from e
            if size not in sizes:
                if len(sizes) < MAX_SIZES:
                    sizes.append(size)
                else:
                    varied = True
    except (tarfile.TarError, EOFError) as e:
        raise MalformedSample(f"shard {url} is corrupt or truncated: {e}") from e
    finally:
        stream.close()  # hashes the end-of-archive blocks too
    return {"count": count, "sha256": sha.hexdigest(), "min_label": lo, "max_label": hi,
            "meta": {"formats": formats, "sizes": sizes, "varied": varied}}


class HashedStream(io.RawIOBase):
    """A read stream that hashes the bytes as they are read: a shard's SHA-256 without a second pass.

    `drain_on_close`: hash what the reader left unread (the end-of-archive blocks) when closed; a reader
    that stops mid-shard closes without it and skips the rest."""

    def __init__(self, body, sha, drain_on_close: bool = True) -> None:
        self.body, self.sha, self.drain_on_close = body, sha, drain_on_close

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.body.read() if n is None or n < 0 else self.body.read(n)
        self.sha.update(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def hexdigest_to_end(self) -> str:
        """Read and hash the rest of the stream; the SHA-256 of all of it."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        if not self.closed:
            if self.drain_on_close:
                self.hexdigest_to_end()
            self.body.close()
        super().close()


def index_shards(
    patterns: str | list[str],
    out: str | None = None,
    *,
    store: Storage | None = None,
    workers: int = 1,
    image_size: int | None = None,
    channels: int = 3,
    classes: list[str] | None = None,
    num_classes: int | None = None,
    progress: bool = False,
) -> tuple[str, ShardManifest]:
    """Count and hash WebDataset shards written by any tool (image under jpg/jpeg/png/webp, label
    under cls) and write their manifest: beside them (``<stem>.manifest.json``) or at `out` (a
    read-only bucket's index kept elsewhere; it then records where the shards are). Returns
    (where the manifest went, the manifest)."""
    from pipeline.shards import ShardError, ShardInfo, ShardManifest, _split_url, expand_braces, index_name

    store = store or Storage()
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ShardError("nothing to index: pass shard URLs or a brace pattern")
    urls = [u for p in patterns for u in expand_braces(p)]
    folders = {_split_url(u)[0] for u in urls}
    if len(folders) != 1:
        raise ShardError(f"shards of one set must share a folder, found {sorted(folders)[:3]}")
    base = folders.pop()
    names = [_split_url(u)[1] for u in urls]
    if len(set(names)) != len(names):
        raise ShardError("a shard is listed twice")
    out = out or join(base, index_name(patterns[0]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(urls), desc="indexing shards", unit="shard")
    results: dict[str, dict] = {}
    pool = _executor(workers)
    try:
        futures = {pool.submit(index_shard_task, u, store.settings): u for u in urls}
        for fut in cf.as_completed(futures):
            url = futures[fut]
            try:
                results[url] = fut.result()
            except StorageError as e:
                raise ShardError(f"cannot read shard {url}: {e}") from e
            except ValueError as e:  # a malformed sample or an unreadable image, named by the worker
                raise ShardError(str(e)) from e
            if bar is not None:
                bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    empty = [u for u in urls if results[u]["count"] == 0]
    if empty:
        raise ShardError(f"shard {empty[0]} holds no samples")
    lo = min(r["min_label"] for r in results.values())
    hi = max(r["max_label"] for r in results.values())
    if lo < 0:
        raise ShardError(f"negative label {lo} in the shards")
    if classes is None:
        k = num_classes if num_classes is not None else hi + 1
        classes = [str(i) for i in range(k)]
    if hi >= len(classes):
        raise ShardError(f"the shards hold label {hi} but only {len(classes)} classes were given")
    infos = [ShardInfo(n, results[u]["count"], results[u]["sha256"], "", results[u]["meta"]) for n, u in zip(names, urls)]
    sizes: list[list[int]] = []
    varied = False
    formats: dict[str, int] = {}
    for info in infos:
        varied = varied or info.meta["varied"]
        sizes += [s for s in info.meta["sizes"] if s not in sizes]
        for k, v in info.meta["formats"].items():
            formats[k] = formats.get(k, 0) + v
    if len(sizes) == 1 and not varied and image_size is None:
        shape, variable = [channels, sizes[0][1], sizes[0][0]], False
    else:
        size = image_size or DEFAULT_IMAGE_SIZE
        shape, variable = [channels, size, size], True
    out_folder = _split_url(out)[0]
    manifest = ShardManifest(index_name(patterns[0]).removesuffix(".manifest.json").removesuffix(".json"), "",
                             classes, shape, sum(i.count for i in infos), infos,
                             {"indexed_from": patterns, "variable_size": variable, "formats": formats,
                              "stored_sizes": sizes[:MAX_SIZES]},
                             base=None if out_folder.rstrip("/") == base.rstrip("/") else base)
    store.write_bytes(out, manifest.to_json().encode())
    return out, manifest
