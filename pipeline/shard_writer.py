"""Streaming, parallel, resumable shard writing.

A *source* (:mod:`pipeline.shard_sources`) yields its samples in *groups* that are small whatever
the data set's size. The writer's router cuts the stream into shards of ``maxcount`` samples and
hands each shard to its pool of worker processes; at most ``2 * workers`` shards are queued or being
written, so what the writer holds is bounded by ``maxcount * (2 * workers + outputs)`` samples, not
by the data set (:attr:`WriteStats.peak_buffered` reports it). A worker streams its shard into a
temporary tar on disk, one sample at a time, hashing as it writes: a source JPEG, PNG or WebP goes
in byte for byte, anything else (PPM, BMP, raw arrays) as lossless PNG.

Why a process pool and not Ray Data: writing shards is one pass of file reads and tar appends with
no shuffle, join or repartition, which is what Ray Data adds; a pool needs no cluster (no Ray
start, no shared lock with the jobs), keeps the shard <-> sample assignment a pure function of the
listing order (which is what makes resuming exact), and saturates the disk or network of one
machine with a few processes. Several machines would each take a range of classes.

The defender's clean set D_val is chosen while streaming: a seeded share of each class within
each group (:class:`pipeline.shard_sources.DvalSplit`); the router sends D_val to one destination
and, optionally, the rest to another, in the same pass.

Resume: each finished shard is recorded (name, count, SHA-256, a digest of the samples that went
in) in ``manifest.partial.json``. A rerun with the same plan re-lists the source, keeps each shard
whose recorded digest matches and writes only the others; ``manifest.json`` appears only when
every shard is written, so a reader never sees a half-written set.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.shard_sources import DvalSplit, Sample, Source, imageset_source
from pipeline.shard_tasks import process_pool, progress_bar, write_shard_task
from pipeline.shardfmt import (
    MANIFEST,
    PARTIAL_MANIFEST,
    TEXT_KEY,
    ShardError,
    ShardInfo,
    ShardManifest,
    manifest_shape,
    shard_name,
)
from pipeline.storage import NotFound, Storage, join

if TYPE_CHECKING:
    from lab.datasets import ImageSet


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
    skipped: list[dict] = field(default_factory=list)  # unreadable source files left out: index, path, reason
    empty_groups: list[str] = field(default_factory=list)  # source groups (class folders) holding no samples


@dataclass
class WriteResult:
    manifests: dict[str, ShardManifest]
    stats: WriteStats


class _Output:
    """One destination: its open shard, its finished shards, and what a resume may reuse."""

    def __init__(self, dest: str, plan: dict, store: Storage, overwrite: bool) -> None:
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
            store.delete(self.final_url)

    def add(self, sample: Sample) -> None:
        self.buffer.append(sample)
        self.count += 1
        self.indices_sha.update(np.int64(sample.index).tobytes())

    def save_partial(self, force: bool = False, every: float = 0.0) -> None:
        now = time.monotonic()
        if not force and now - self.last_saved < every:
            return
        shards = [asdict(self.done[n]) for n in sorted(self.done)]
        if not self.done:
            shards = [asdict(s) for s in self.reusable.values()]
        self.store.write_bytes(self.partial_url, json.dumps({"plan": self.plan, "shards": shards}, indent=1).encode())
        self.last_saved = now

    def skipped(self) -> list[dict]:
        """The unreadable source files its shards left out (each shard's ``meta["skipped"]``), in shard order."""
        return [entry for n in sorted(self.done) for entry in self.done[n].meta.get("skipped", [])]

    def finish(self, source: Source, meta: dict) -> ShardManifest:
        if not self.done:
            raise ShardError(f"no samples went to {self.dest}: nothing to write")
        infos = [self.done[n] for n in sorted(self.done) if self.done[n].count]  # all-unreadable shards: unwritten
        skipped = self.skipped()
        if not infos:
            what = ("readable image", "source files were unreadable") if source.tokenizer is None else \
                ("usable record", "records were left out")
            raise ShardError(f"no {what[0]} went to {self.dest}: all {len(skipped)} {what[1]}, e.g. "
                             f"{skipped[0]['path']} ({skipped[0]['reason']})")
        if skipped:
            meta = {**meta, "skipped": len(skipped)}
        if source.tokenizer is None:
            shape, shape_meta = manifest_shape(infos, source.channels, source.image_size, source.fixed_shape)
        else:  # text: no image shape; what a reader yields is the manifest's max_length
            shape, shape_meta = [], {"formats": {TEXT_KEY: sum(i.meta.get("formats", {}).get(TEXT_KEY, 0)
                                                               for i in infos)}}
        manifest = ShardManifest(
            source.name, source.split, list(source.classes), shape, sum(i.count for i in infos), infos,
            {"indices_sha256_16": self.indices_sha.hexdigest()[:16], **shape_meta, "plan": self.plan, **meta},
            task=source.task, tokenizer=source.tokenizer, max_length=source.max_length)
        self.store.write_bytes(self.final_url, manifest.to_json().encode())
        self.store.delete(self.partial_url)
        return manifest


@dataclass
class _Pending:
    out: _Output
    number: int
    digest: str
    count: int


class _ShardPool:
    """Shards written in worker processes, at most `queue` of them pending: a full queue waits for
    one to finish, which bounds what the writer holds. A finished shard is recorded in its output
    (and, every `save_every` seconds, in its partial manifest, where a resume finds it)."""

    def __init__(self, workers: int, queue: int, store: Storage, tmp_dir: str | None, stats: WriteStats,
                 bar, save_every: float, fit: tuple[int, int | None] | None = None) -> None:
        self.executor = process_pool(workers)
        self.queue, self.settings, self.tmp_dir, self.fit = queue, store.settings, tmp_dir, fit
        self.stats, self.bar, self.save_every = stats, bar, save_every
        self.pending: dict[cf.Future, _Pending] = {}
        self.in_flight = 0  # samples in pending shards

    def submit(self, out: _Output, digest: str, samples: list[Sample]) -> None:
        while len(self.pending) >= self.queue:
            self._collect(next(cf.as_completed(self.pending)))
        task = {"url": join(out.dest, shard_name(out.number)), "tmp_dir": self.tmp_dir, "fit": self.fit,
                "samples": [(f"{s.index:09d}", s.label, s.index, s.path, s.pixels, s.text) for s in samples]}
        fut = self.executor.submit(write_shard_task, task, self.settings)
        self.pending[fut] = _Pending(out, out.number, digest, len(samples))
        self.in_flight += len(samples)

    def drain(self) -> None:
        while self.pending:
            self._collect(next(cf.as_completed(self.pending)))

    def salvage(self) -> None:
        """After a failure: stop, and record the shards that did finish (a resume keeps them)."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        for fut in [f for f in list(self.pending) if f.done() and not f.cancelled() and f.exception() is None]:
            self._collect(fut)

    def close(self) -> None:
        self.executor.shutdown(wait=True)

    def _collect(self, fut: cf.Future) -> None:
        job = self.pending.pop(fut)
        self.in_flight -= job.count
        info = fut.result()
        job.out.done[job.number] = ShardInfo(shard_name(job.number), info["count"], info["sha256"], job.digest,
                                             info["meta"])
        self.stats.shards_written += 1
        self.stats.bytes_written += info["bytes"]
        if info.get("worker_rss_mb") is not None:
            self.stats.peak_worker_rss_mb = max(self.stats.peak_worker_rss_mb or 0.0, info["worker_rss_mb"])
        self.bar.update(job.count)
        job.out.save_partial(every=self.save_every)


class _Router:
    """Sends each sample to its output (everything to `main`; with a D_val split, D_val to `main` and
    the rest to `rest` or nowhere) and cuts an output's shard at `maxcount` samples: a shard that an
    earlier write of the same samples left whole is kept, any other goes to the pool."""

    def __init__(self, main: _Output, rest: _Output | None, dval: DvalSplit | None, maxcount: int,
                 pool: _ShardPool, root: str, stats: WriteStats, bar) -> None:
        self.main, self.rest, self.dval, self.maxcount, self.pool, self.root = main, rest, dval, maxcount, pool, root
        self.stats, self.bar = stats, bar
        self.outputs = [main] if rest is None else [main, rest]

    def add(self, group: str, samples: list[Sample]) -> None:
        chosen = self.dval.choose(group, samples) if self.dval is not None else None
        for pos, sample in enumerate(samples):
            out = self.main if chosen is None or pos in chosen else self.rest
            if out is None:
                continue
            out.add(sample)
            self.stats.samples += 1
            self._note_held()
            if len(out.buffer) >= self.maxcount:
                self._cut(out)

    def finish(self) -> None:
        """Cut every output's last, short shard."""
        for out in self.outputs:
            self._cut(out)

    def _note_held(self) -> None:
        held = self.pool.in_flight + sum(len(o.buffer) for o in self.outputs)
        self.stats.peak_buffered = max(self.stats.peak_buffered, held)

    def _cut(self, out: _Output) -> None:
        if not out.buffer:
            return
        samples, out.buffer = out.buffer, []
        h = hashlib.sha256()
        for s in samples:
            h.update(s.digest_part(self.root))
        digest = h.hexdigest()
        name = shard_name(out.number)
        old = out.reusable.get(name)
        if old is not None and old.source_digest == digest and out.store.exists(join(out.dest, name)):
            out.done[out.number] = old
            self.stats.shards_reused += 1
            self.bar.update(len(samples))
        else:
            self.pool.submit(out, digest, samples)
            self._note_held()
        out.number += 1


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
    if maxcount < 1:
        raise ShardError(f"maxcount must be >= 1, got {maxcount}")
    if workers < 1:
        raise ShardError(f"workers must be >= 1, got {workers}")
    if rest is not None and dval is None:
        raise ShardError("a destination for the rest needs a D_val split (dval fraction)")
    store = store or Storage()
    keep = None if indices is None else _checked_indices(indices, source)
    plan = {"source": source.describe, "split": source.split, "maxcount": maxcount, "limit": limit,
            "indices_sha256_16": None if keep is None else hashlib.sha256(
                np.array(sorted(keep), dtype=np.int64).tobytes()).hexdigest()[:16],
            "dval": None if dval is None else asdict(dval), "image_size": source.image_size}
    if source.tokenizer is not None:  # only text plans name these, so an image write's plan (and resume) is unchanged
        plan.update(task=source.task, tokenizer_sha256=source.tokenizer.sha256, max_length=source.max_length)
    main = _Output(dest, {**plan, "role": "dval" if dval else "all"}, store, overwrite)
    other = None
    if rest is not None:
        if rest.rstrip("/") == dest.rstrip("/"):
            raise ShardError(f"D_val and the rest cannot share the destination {dest}")
        other = _Output(rest, {**plan, "role": "rest"}, store, overwrite)
    stats = WriteStats()
    started = time.perf_counter()
    bar = progress_bar(progress, desc=f"shards -> {dest}", unit="img" if source.tokenizer is None else "seq")
    fit = None if source.tokenizer is None else (source.max_length, source.tokenizer.bos_id)
    pool = _ShardPool(workers, queue or 2 * workers, store, tmp_dir, stats, bar, save_every, fit)
    router = _Router(main, other, dval, maxcount, pool, source.root, stats, bar)
    outputs = {dest: main} if other is None else {dest: main, rest: other}
    seen: set[int] = set()
    try:
        for group, samples in _limited(source.groups(), keep, limit, seen, stats):
            router.add(group, samples)
        router.finish()
        pool.drain()
        if keep is not None and limit is None and keep - seen:
            missing = sorted(keep - seen)
            raise ShardError(f"{len(missing)} of the {len(keep)} indices asked for are not in the source "
                             f"{source.name}/{source.split} (e.g. {', '.join(map(str, missing[:3]))}); the "
                             f"shards written so far are kept in {PARTIAL_MANIFEST}, no manifest was finalised")
    except BaseException:
        pool.salvage()
        for out in outputs.values():
            out.save_partial(force=True)
        raise
    finally:
        pool.close()
        bar.close()
    manifests = {}
    for url, out in outputs.items():
        extra = dict(meta or {})
        if stats.empty_groups:
            extra["empty_groups"] = list(stats.empty_groups)
        if dval is not None:
            extra["dval"] = {**asdict(dval), "role": out.plan["role"], "count": out.count}
        manifests[url] = out.finish(source, extra)
        stats.skipped += out.skipped()
    stats.seconds = time.perf_counter() - started
    return WriteResult(manifests, stats)


def write_warnings(stats: WriteStats, what: str = "unreadable source file(s)") -> list[str]:
    """One line per thing a write left out, for the terminal (the manifest keeps the full lists); `what`
    names the skipped samples (text: records too long for max_length)."""
    lines = []
    if stats.skipped:
        first = stats.skipped[0]
        lines.append(f"left out {len(stats.skipped)} {what}, e.g. {first['path']} "
                     f"({first['reason']}); each is listed under its shard's meta.skipped in the manifest")
    if stats.empty_groups:
        lines.append(f"{len(stats.empty_groups)} source group(s) hold no samples (an empty class folder is a "
                     f"label with no samples): {', '.join(stats.empty_groups[:5])}")
    return lines


def _checked_indices(indices: Iterable[int], source: Source) -> set[int]:
    """The source indices to keep; duplicates, negative ones and (where the source knows its size)
    ones past its end are refused before anything is written."""
    wanted = [int(i) for i in indices]
    keep = set(wanted)
    if not keep:
        raise ShardError("the list of indices to keep is empty")
    if len(keep) != len(wanted):
        raise ShardError(f"the indices to keep repeat {len(wanted) - len(keep)} entries: each sample can be kept once")
    low, high = min(keep), max(keep)
    if low < 0:
        raise ShardError(f"indices to keep must be >= 0, got {low}")
    if source.size is not None and high >= source.size:
        outside = sum(1 for i in keep if i >= source.size)
        raise ShardError(f"{outside} of the {len(keep)} indices to keep lie past the end of {source.name}/"
                         f"{source.split} ({source.size} samples, indices 0..{source.size - 1}; largest asked: {high})")
    return keep


def _limited(groups: Iterator[tuple[str, list[Sample]]], keep: set[int] | None, limit: int | None,
             seen: set[int], stats: WriteStats) -> Iterator[tuple[str, list[Sample]]]:
    """The source's groups with only the `keep` indices, stopping after `limit` samples; notes the
    kept indices met (`seen`) and the groups that hold no sample at all (`stats.empty_groups`)."""
    taken = 0
    for group, samples in groups:
        if not samples:
            stats.empty_groups.append(group)
        if keep is not None:
            seen.update(s.index for s in samples if s.index in keep)
            samples = [s for s in samples if s.index in keep]
        if limit is not None:
            samples = samples[: max(limit - taken, 0)]
        if samples:
            taken += len(samples)
            yield group, samples
        if limit is not None and taken >= limit:
            return


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
    workers: int = 1,
) -> ShardManifest:
    """Write an in-memory `data` set as PNG shards of at most `maxcount` samples (replacing what is
    at `dest`). Folders of files and large sets stream through :func:`write_source`."""
    if len(data) == 0:
        raise ShardError(f"refusing to write shards of an empty data set to {dest}")
    indices = np.arange(len(data)) if indices is None else np.asarray(indices)
    if len(indices) != len(data):
        raise ShardError(f"{len(indices)} source indices for {len(data)} samples")
    source = imageset_source(data, indices, dataset or data.name, split)
    result = write_source(source, dest, maxcount=maxcount, workers=workers, store=store, meta=meta,
                          progress=progress, overwrite=True)
    return result.manifests[dest]
