"""WebDataset tar shards: written from any lab data set, read back split exactly across ranks.

Layout: ``DEST/000000.tar, 000001.tar, ...`` plus ``DEST/manifest.json`` (counts, classes, image
shape, per-shard SHA-256). Each sample holds ``png`` (lossless image), ``cls`` (label) and ``idx``
(index in the source split). DEST is a local folder or ``s3://bucket/prefix``.

Reading splits the *samples* (not just the shards) across ranks: rank r of W owns the contiguous
global positions ``[r*N/W, (r+1)*N/W)`` and opens only the shards overlapping them; DataLoader
workers split a rank's range the same way. Every rank yields exactly ``ceil(N/W)`` samples (short
ranks repeat a few of their own, flagged as padding), so every rank gets the same number of batches
and DDP never waits on a rank that ran out of data.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fip.training import generator
from lab.datasets import ImageSet, decode_png, encode_png
from pipeline.storage import Storage, StorageError, join

MANIFEST = "manifest.json"
SHARD_NAME = "{:06d}.tar"


class ShardError(ValueError):
    """A shard is missing, empty, corrupt or truncated; the message names it."""


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass
class ShardManifest:
    dataset: str
    split: str
    classes: list[str]
    image_shape: list[int]
    count: int
    shards: list[ShardInfo]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardManifest:
        try:
            d = json.loads(text)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            return cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ShardError(f"{where} is not a shard manifest: {e}") from e

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------- writing
def _shard_bytes(data: ImageSet, rows: np.ndarray, indices: np.ndarray) -> bytes:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for r in rows:
            sink.write({"__key__": f"{int(indices[r]):09d}", "png": encode_png(data.x[r]), "cls": int(data.y[r]),
                        "idx": str(int(indices[r])).encode()})
    return buf.getvalue()


def write_shards(
    data: ImageSet,
    dest: str,
    maxcount: int = 1000,
    indices: np.ndarray | list[int] | None = None,
    dataset: str = "",
    split: str = "",
    meta: dict | None = None,
    progress: bool = False,
    store: Storage | None = None,
) -> ShardManifest:
    """Write `data` as tar shards of at most `maxcount` samples to a folder or s3:// prefix."""
    store = store or Storage()
    if len(data) == 0:
        raise ShardError(f"refusing to write shards of an empty data set to {dest}")
    if maxcount < 1:
        raise ShardError(f"maxcount must be >= 1, got {maxcount}")
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    if len(indices) != len(data):
        raise ShardError(f"{len(indices)} source indices for {len(data)} samples")
    infos = []
    chunks = range(0, len(data), maxcount)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(data), desc=f"shards -> {dest}", unit="img")
    for n, start in enumerate(chunks):
        rows = np.arange(start, min(start + maxcount, len(data)))
        payload = _shard_bytes(data, rows, indices)
        name = SHARD_NAME.format(n)
        store.write_bytes(join(dest, name), payload)
        infos.append(ShardInfo(name, len(rows), hashlib.sha256(payload).hexdigest()))
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    manifest = ShardManifest(dataset or data.name, split, list(data.classes), list(data.shape), len(data), infos,
                             {"indices_sha256_16": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest()[:16],
                              **(meta or {})})
    store.write_bytes(join(dest, MANIFEST), manifest.to_json().encode())
    return manifest


# ---------------------------------------------------------------- locating shards
def expand_braces(pattern: str) -> list[str]:
    """``a/{000000..000003}.tar`` -> four URLs (zero padding kept); no braces -> [pattern]."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return [
        url
        for i in range(int(lo), int(hi) + 1)
        for url in expand_braces(pattern[: m.start()] + str(i).zfill(width) + pattern[m.end() :])
    ]


@dataclass
class ShardSource:
    """The shard URLs to read and their manifest (counts are what make the exact rank split possible)."""

    urls: list[str]
    manifest: ShardManifest
    store: Storage = field(default_factory=Storage)

    @property
    def counts(self) -> list[int]:
        by_name = {s.name: s.count for s in self.manifest.shards}
        return [by_name[u.rsplit("/", 1)[-1]] for u in self.urls]

    @property
    def total(self) -> int:
        return sum(self.counts)


def open_shards(spec: str, store: Storage | None = None) -> ShardSource:
    """Resolve a folder/prefix holding ``manifest.json``, or a brace pattern beside one."""
    store = store or Storage()
    spec = str(spec)
    if spec.endswith(".tar") or "{" in spec:
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        urls = expand_braces(spec)
    else:
        base, urls = spec.rstrip("/"), None
    manifest_url = join(base, MANIFEST)
    try:
        manifest = ShardManifest.from_json(store.read_bytes(manifest_url).decode(), manifest_url)
    except StorageError as e:
        raise ShardError(f"no shard manifest at {manifest_url} ({e}); write shards with `fip shard`") from e
    if urls is None:
        urls = [join(base, s.name) for s in manifest.shards]
    known = {s.name: s for s in manifest.shards}
    for u in urls:
        name = u.rsplit("/", 1)[-1]
        if name not in known:
            raise ShardError(f"shard {u} is not listed in {manifest_url}")
        if known[name].count == 0:
            raise ShardError(f"shard {u} is empty (0 samples in the manifest)")
    if not urls:
        raise ShardError(f"{spec}: no shards to read")
    return ShardSource(urls, manifest, store)


# ---------------------------------------------------------------- reading
@dataclass
class ReadStats:
    skipped: int = 0
    skipped_shards: list[str] = field(default_factory=list)


def _iter_shard(url: str, channels: int, store: Storage) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Decoded (image uint8, label, source index) of one shard, in order; errors name the shard."""
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_iterator

    try:
        stream = store.open_read(url)
    except StorageError as e:
        raise ShardError(f"cannot open shard {url}: {e}") from e
    try:
        files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            try:
                yield decode_png(sample["png"], channels), int(sample["cls"]), int(sample["idx"])
            except (KeyError, ValueError, OSError) as e:
                raise ShardError(f"shard {url}: sample {sample.get('__key__')!r} is malformed ({e})") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {url} is corrupt or truncated: {e}") from e
    finally:
        stream.close()


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share of ``total`` positions for ``rank`` of ``world`` (sizes differ by at most one)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return (total * rank) // world, (total * (rank + 1)) // world


def iter_range(
    source: ShardSource, start: int, stop: int, skip_corrupt: bool = False, stats: ReadStats | None = None
) -> Iterator[tuple[torch.Tensor, int, int]]:
    """Samples at global positions [start, stop), opening only the shards that overlap them.

    A shard that yields fewer samples than its manifest count is truncated: an error, or with
    `skip_corrupt` the missing samples are counted in `stats` and the stream goes on.
    """
    channels = source.manifest.image_shape[0]
    offset = 0
    for url, count in zip(source.urls, source.counts, strict=True):
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            seen = 0
            try:
                for pos, sample in enumerate(_iter_shard(url, channels, source.store)):
                    seen = pos + 1
                    if pos >= count:
                        raise ShardError(f"shard {url} holds more samples than its manifest count {count}")
                    if lo <= offset + pos < hi:
                        yield sample
                    if offset + pos + 1 >= hi:
                        break
                if offset + seen < hi:
                    raise ShardError(f"shard {url} is truncated: {seen} samples, manifest says {count}")
            except ShardError:
                if not skip_corrupt:
                    raise
                missing = hi - max(lo, offset + seen)
                if stats is not None:
                    stats.skipped += max(missing, 0)
                    stats.skipped_shards.append(url)
        offset += count
        if offset >= stop:
            break


class RankStream(IterableDataset):
    """This rank's samples as (image float, label, is_padding), split again across DataLoader workers.

    Yields exactly ``ceil(N / world)`` items per epoch on every rank. With `shuffle`, a buffer
    shuffle seeded by (seed, epoch, rank, worker) reorders them.
    """

    def __init__(self, source: ShardSource, rank: int, world: int, shuffle: bool = False, seed: int = 0,
                 buffer: int = 1000, skip_corrupt: bool = False, limit: int | None = None) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.shuffle, self.seed, self.buffer, self.skip_corrupt = shuffle, seed, buffer, skip_corrupt
        total = source.total if limit is None else min(limit, source.total)
        self.start, self.stop = rank_range(total, rank, world)
        self.length = math.ceil(total / world)
        self.epoch = 0
        self.stats = ReadStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def _worker_slice(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, self.length
        return rank_range(self.length, info.id, info.num_workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        lo, hi = self._worker_slice()
        real = self.stop - self.start
        if real == 0:
            raise ShardError(f"rank {self.rank} of {self.world} has no samples: {self.source.total} samples in total")
        # positions [lo, hi) of this rank's padded sequence; those past `real` repeat earlier samples
        real_lo, real_hi = self.start + min(lo, real), self.start + min(hi, real)
        stream = self._padded(real_lo, real_hi, hi - lo)
        return self._shuffled(stream) if self.shuffle else stream

    def _padded(self, a: int, b: int, length: int) -> Iterator[tuple[torch.Tensor, int, bool]]:
        """Samples at positions [a, b), then padding (repeats of the first ones, flagged) up to `length`.

        Skipped (corrupt) samples are replaced by padding too, so every rank yields its full length."""
        first: list = []
        produced = 0
        for img, label, _ in iter_range(self.source, a, b, self.skip_corrupt, self.stats):
            item = (img.float() / 255.0, label, False)
            if len(first) < 64:
                first.append(item)
            produced += 1
            yield item
        need = length - produced
        if need and not first:
            first = [(img.float() / 255.0, label, False) for img, label, _ in
                     iter_range(self.source, self.start, min(self.stop, self.start + 64), self.skip_corrupt)]
            if not first:
                raise ShardError(f"rank {self.rank}: every shard in its range is unreadable")
        for k in range(need):
            img, label, _ = first[k % len(first)]
            yield img, label, True

    def _shuffled(self, stream):
        info = get_worker_info()
        wid = info.id if info is not None else 0
        g = generator(self.seed, "shuffle", self.epoch, self.rank, wid)
        buf: list = []
        for item in stream:
            buf.append(item)
            if len(buf) >= self.buffer:
                yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))
        while buf:
            yield buf.pop(int(torch.randint(len(buf), (1,), generator=g)))


def _collate(items):
    xs, ys, pads = zip(*items, strict=True)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long), torch.tensor(pads, dtype=torch.bool)


def rank_loader(stream: RankStream, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Batches of (x, y, is_padding) for this rank; same batch count on every rank."""
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                      persistent_workers=False)


def read_all(source: ShardSource, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sample in order as (uint8 images, labels, source indices): for small sets and tests."""
    total = source.total if limit is None else min(limit, source.total)
    xs, ys, idx = [], [], []
    for img, label, i in iter_range(source, 0, total):
        xs.append(img)
        ys.append(label)
        idx.append(i)
    if not xs:
        raise ShardError("no samples read")
    return torch.stack(xs), torch.tensor(ys), torch.tensor(idx)
