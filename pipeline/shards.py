"""WebDataset tar shards: located, counted and read back split exactly across ranks.

Any standard WebDataset shard is read: a sample is the tar members sharing a key, with an image
under ``jpg``, ``jpeg``, ``png`` or ``webp`` and its label under ``cls`` (``idx``, the index in the
source split, is optional). Shards written here (:mod:`pipeline.shard_writer`, ``fip shard``) are
``DEST/000000.tar, 000001.tar, ...`` plus ``DEST/manifest.json``; a source JPEG keeps its bytes,
raw arrays are lossless PNG. DEST is a local folder or ``s3://bucket/prefix``. The format itself
(manifest, names, tar layout, hashing) is :mod:`pipeline.shardfmt`.

The exact rank split needs each shard's sample count before reading, so every shard set has a
manifest (counts, classes, image shape, per-shard SHA-256): ours beside our shards, or for shards
made by other tools an index that ``fip shard index`` writes beside them
(``<stem>.manifest.json``) or anywhere else (a read-only bucket), whose path is then the spec.

Reading splits the *samples* (not just the shards) across ranks: rank r of W owns the contiguous
global positions ``[r*N/W, (r+1)*N/W)`` and opens only the shards overlapping them; DataLoader
workers split a rank's range the same way. Every rank yields exactly ``ceil(N/W)`` samples (short
ranks repeat a few of their own, flagged as padding), so every rank gets the same number of batches
and DDP never waits on a rank that ran out of data. Decoding and the transform to a fixed size
(:mod:`pipeline.transforms`) run where the samples are read: in the DataLoader's workers.

Text shards (``task: causal-lm``, ``fip shard text``) go through the same reader, split and checks: one
decode seam (:func:`_decoder`), keyed by the manifest's task, turns a stored sample into what the model
takes, here a ``(max_length,)`` row of token ids and its aligned labels (:func:`text_rows`).
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fip.tasks import IGNORE
from fip.training import generator
from pipeline.shardfmt import (
    MANIFEST,
    PARTIAL_MANIFEST,
    HashedStream,
    MalformedSample,
    ShardError,
    ShardHashError,
    ShardInfo,
    ShardManifest,
    TokenizerInfo,
    expand_braces,
    fit_prompt,
    index_name,
    iter_tar_samples,
    parse_sample,
    parse_text_sample,
    split_url,
)
from pipeline.storage import NotFound, Storage, StorageError, join
from pipeline.transforms import KEEP, ImageDecodeError, Transform, eval_transform, train_transform


@dataclass
class ShardSource:
    """The shard URLs to read and their manifest (counts are what make the exact rank split possible)."""

    urls: list[str]
    manifest: ShardManifest
    store: Storage = field(default_factory=Storage)

    @property
    def infos(self) -> list[ShardInfo]:
        """The manifest's entry of each URL, in URL order."""
        by_name = {s.name: s for s in self.manifest.shards}
        return [by_name[split_url(u)[1]] for u in self.urls]

    @property
    def counts(self) -> list[int]:
        return [info.count for info in self.infos]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def channels(self) -> int:
        return int(self.manifest.image_shape[0])


def _read_manifest(url: str, store: Storage) -> ShardManifest | None:
    """The manifest at `url`, None where there is none; a store that cannot be reached is an error naming it."""
    try:
        return ShardManifest.from_json(store.read_bytes(url).decode(), url)
    except NotFound:
        return None


def open_shards(spec: str, store: Storage | None = None, tokenizer: str | None = None) -> ShardSource:
    """Resolve a shard set: a folder/prefix holding ``manifest.json``; a brace pattern or ``.tar`` with
    a manifest or a ``fip shard index`` index beside it; or the path of a manifest/index file.

    `tokenizer` (a tokenizer folder, text shards): refuse the set unless it was written with that tokenizer."""
    store = store or Storage()
    spec = str(spec).strip()
    if spec.endswith(".json"):
        manifest = _read_manifest(spec, store)
        if manifest is None:
            raise ShardError(f"no shard manifest at {spec}")
        base = (manifest.base or split_url(spec)[0]).rstrip("/")
        urls = [join(base, s.name) for s in manifest.shards]
        where = spec
    elif spec.endswith(".tar") or "{" in spec:
        urls = expand_braces(spec)
        folders = {split_url(u)[0] for u in urls}
        if len(folders) != 1:
            raise ShardError(f"{spec}: shards of one set must share a folder, found {len(folders)}")
        base = folders.pop()
        candidates = [join(base, index_name(spec)), join(base, MANIFEST)]
        manifest, where = None, candidates[0]
        for url in dict.fromkeys(candidates):
            manifest = _read_manifest(url, store)
            if manifest is not None:
                where = url
                break
        if manifest is None:
            raise ShardError(f"no index for {spec}: looked for {' and '.join(dict.fromkeys(candidates))}; run "
                             f"`fip shard index '{spec}'` (with --out for a read-only bucket, then pass that file)")
    else:
        base = spec.rstrip("/")
        where = join(base, MANIFEST)
        manifest = _read_manifest(where, store)
        if manifest is None:
            hint = ("an interrupted write left " + PARTIAL_MANIFEST + ": rerun `fip shard` to finish it"
                    if store.exists(join(base, PARTIAL_MANIFEST)) else "write shards with `fip shard`, or index "
                    "shards made elsewhere with `fip shard index`")
            raise ShardError(f"no shard manifest at {where} ({hint})")
        urls = [join(base, s.name) for s in manifest.shards]
    known = {s.name: s for s in manifest.shards}
    for u in urls:
        name = split_url(u)[1]
        if name not in known:
            raise ShardError(f"shard {u} is not listed in {where}")
        if known[name].count == 0:
            raise ShardError(f"shard {u} is empty (0 samples in the manifest)")
    if not urls:
        raise ShardError(f"{spec}: no shards to read")
    if tokenizer is not None:
        from pipeline.text_source import check_tokenizer

        check_tokenizer(manifest, tokenizer, where)
    return ShardSource(urls, manifest, store)


def default_transform(manifest: ShardManifest) -> Transform:
    """What a plain reader does: decode only, or resize + centre crop when stored sizes vary."""
    if manifest.variable_size:
        return eval_transform(int(manifest.image_shape[-1]))
    return KEEP


def train_transform_for(manifest: ShardManifest) -> Transform | None:
    """The fine-tuning transform: random-resized crop + flip when stored sizes vary; None (decode
    only) for fixed-size shards, whose augmentation is FIP's own batch crop and flip."""
    return train_transform(int(manifest.image_shape[-1])) if manifest.variable_size else None


# ---------------------------------------------------------------- reading
@dataclass
class ReadStats:
    skipped: int = 0
    skipped_shards: list[str] = field(default_factory=list)


@dataclass
class RawSample:
    """One sample as stored: encoded image bytes (text: (prompt ids, response ids)), label (text: 0), source
    index (None when the shard has no ``idx``).

    `problem`: the sample is malformed (no image, no label); the shard's later samples still read."""

    key: str
    data: bytes | tuple[list[int], list[int]]
    label: int
    index: int | None
    problem: ShardError | None = None


def _parse(sample: dict, url: str, text: bool) -> RawSample:
    try:
        if text:
            key, ids, index = parse_text_sample(sample, url)
            return RawSample(key, ids, 0, index)
        return RawSample(*parse_sample(sample, url))
    except MalformedSample as e:
        return RawSample(str(sample.get("__key__")), b"", -1, None, ShardError(str(e)))


def iter_raw_shard(url: str, store: Storage, expect: ShardInfo | None = None, text: bool = False
                   ) -> Iterator[RawSample]:
    """The samples of one shard in order, undecoded (`text`: text samples); errors name the shard.

    With `expect` (its manifest entry), a shard read to its end is checked against its count, then its
    SHA-256: the bytes are hashed as the tar reader takes them, so the check costs no second pass."""
    try:
        stream = HashedStream(store.open_read(url), hashlib.sha256(), drain_on_close=False)
    except StorageError as e:
        raise ShardError(f"cannot open shard {url}: {e}") from e
    seen = 0
    try:
        for sample in iter_tar_samples(stream):
            seen += 1
            yield _parse(sample, url, text)
        if expect is not None and seen < expect.count:
            raise ShardError(f"shard {url} is truncated: {seen} samples, manifest says {expect.count}")
        if expect is not None and expect.sha256:
            digest = stream.hexdigest_to_end()
            if digest != expect.sha256:
                raise ShardHashError(f"shard {url} does not match its manifest: SHA-256 {digest[:16]}..., the "
                                     f"manifest says {expect.sha256[:16]}... (changed or damaged since it was written)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"shard {url} is corrupt or truncated: {e}") from e
    except ValueError as e:  # a duplicate member
        if isinstance(e, ShardError):
            raise
        raise ShardError(f"shard {url} is malformed: {e}") from e
    finally:
        stream.close()


def rank_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous share of ``total`` positions for ``rank`` of ``world`` (sizes differ by at most one)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return (total * rank) // world, (total * (rank + 1)) // world


def _decode_image(source: ShardSource, url: str, raw: RawSample, transform: Transform, g
                  ) -> tuple[torch.Tensor, int]:
    """(uint8 image, label) of an image sample; a label out of range or an image that does not decode to
    the manifest's shape is an error naming the sample."""
    num_classes = source.manifest.num_classes
    if not 0 <= raw.label < num_classes:
        raise ShardError(f"shard {url}: sample {raw.key!r} has label {raw.label}, the manifest has {num_classes} "
                         f"classes")
    try:
        img = transform(raw.data, source.channels, g)
    except ImageDecodeError as e:
        raise ShardError(f"shard {url}: sample {raw.key!r} is malformed ({e})") from e
    if transform.mode == "keep" and list(img.shape) != list(source.manifest.image_shape):
        raise ShardError(f"shard {url}: sample {raw.key!r} is {tuple(img.shape)}, the manifest says "
                         f"{tuple(source.manifest.image_shape)} (images of varying size need a resizing transform)")
    return img, raw.label


def text_rows(prompt: list[int], response: list[int], tokenizer: TokenizerInfo, max_length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal LM's (x, y) rows of one record, each ``(max_length,)`` int64 (:mod:`fip.tasks`' contract):
    x is prompt + response + eos, right-padded with the pad id; y is the token id at the response's
    positions and the eos's, :data:`fip.tasks.IGNORE` at the prompt and the padding. A record longer than
    `max_length` loses the start of its prompt (after its BOS), so the response survives; one whose response
    does not fit (:func:`pipeline.shardfmt.fit_prompt`) is a ValueError."""
    kept = fit_prompt(prompt, len(response), max_length, tokenizer.bos_id)
    if kept is None:
        raise ValueError(f"its response of {len(response)} tokens and the eos do not fit max_length {max_length}")
    scored = [*response, tokenizer.eos_id]
    n = len(kept) + len(scored)
    x = torch.full((max_length,), tokenizer.pad_id, dtype=torch.long)
    y = torch.full((max_length,), IGNORE, dtype=torch.long)
    x[:n] = torch.tensor(kept + scored, dtype=torch.long)
    y[len(kept):n] = torch.tensor(scored, dtype=torch.long)
    return x, y


def _decode_text(manifest: ShardManifest, url: str, raw: RawSample) -> tuple[torch.Tensor, torch.Tensor]:
    """(x row, y row) of a text sample; token ids outside the vocabulary or a response too long are errors
    naming the sample."""
    prompt, response = raw.data
    vocab = manifest.tokenizer.vocab_size
    bad = next((t for t in (*prompt, *response) if not 0 <= t < vocab), None)
    if bad is not None:
        raise ShardError(f"shard {url}: sample {raw.key!r} has token id {bad}, outside the tokenizer's vocabulary "
                         f"of {vocab} ({manifest.tokenizer.name})")
    try:
        return text_rows(prompt, response, manifest.tokenizer, manifest.max_length)
    except ValueError as e:
        raise ShardError(f"shard {url}: sample {raw.key!r} does not fit ({e})") from e


Decoder = Callable[[str, RawSample, torch.Generator | None], tuple[torch.Tensor, "int | torch.Tensor"]]


def _decoder(source: ShardSource, transform: Transform) -> Decoder:
    """The one seam between a stored sample and what the model takes, keyed by the manifest's task:
    (image, label) for classification, (token ids, aligned labels) for a causal LM."""
    if source.manifest.is_text:
        return lambda url, raw, g: _decode_text(source.manifest, url, raw)
    return lambda url, raw, g: _decode_image(source, url, raw, transform, g)


def iter_range(
    source: ShardSource, start: int, stop: int, skip_corrupt: bool = False, stats: ReadStats | None = None,
    transform: Transform | None = None, rng: Callable[[int], torch.Generator] | None = None,
) -> Iterator[tuple[torch.Tensor, int | torch.Tensor, int]]:
    """(uint8 image, label, source index) at global positions [start, stop), opening only the shards
    that overlap them; for text shards (token ids, aligned labels, source index) (:func:`text_rows`).
    `transform` (images) defaults to :func:`default_transform`; `rng(position)` seeds a random one (so a
    sample's augmentation does not depend on which worker reads it).

    A range that reaches a shard's end reads on to the end of its tar: a shard holding more or fewer
    samples than its manifest count, or bytes that do not match its SHA-256, is an error. A sample
    that is malformed, does not decode or has a label out of range is an error too; with
    `skip_corrupt` that one sample is counted in `stats` and the stream goes on (a broken tar loses
    the rest of its shard's range, counted the same way).
    """
    transform = transform or default_transform(source.manifest)
    decode = _decoder(source, transform)
    text = source.manifest.is_text
    offset = 0
    for url, info in zip(source.urls, source.infos, strict=True):
        count = info.count
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            to_end = hi == offset + count  # this range reads the shard to its end: its count and hash are checked
            seen = 0
            raws = iter_raw_shard(url, source.store, info if to_end else None, text)
            try:
                for pos, raw in enumerate(raws):
                    seen = pos + 1
                    if pos >= count:
                        raise ShardError(f"shard {url} holds more samples than its manifest count {count}")
                    if offset + pos < lo:
                        continue
                    try:
                        if raw.problem is not None:
                            raise raw.problem
                        x, y = decode(url, raw, rng(offset + pos) if rng else None)
                    except ShardError:
                        if not skip_corrupt:
                            raise
                        _note_skip(stats, url, 1)
                    else:
                        yield x, y, offset + pos if raw.index is None else raw.index
                    if offset + pos + 1 >= hi and not to_end:
                        break
                if offset + seen < hi:
                    raise ShardError(f"shard {url} is truncated: {seen} samples, manifest says {count}")
            except ShardHashError:
                if not skip_corrupt:
                    raise
                _note_skip(stats, url, 0)  # its bad samples, if any, were counted one by one
            except ShardError:
                if not skip_corrupt:
                    raise
                _note_skip(stats, url, max(hi - max(lo, offset + seen), 0))
            finally:
                raws.close()
        offset += count
        if offset >= stop:
            break


def _note_skip(stats: ReadStats | None, url: str, n: int) -> None:
    if stats is not None:
        stats.skipped += n
        if url not in stats.skipped_shards:
            stats.skipped_shards.append(url)


class RankStream(IterableDataset):
    """This rank's samples as (image, label, is_padding), split again across DataLoader workers.

    Yields exactly ``ceil(N / world)`` items per epoch on every rank. With `shuffle`, a buffer
    shuffle seeded by (seed, epoch, rank, worker) reorders them. Images are float in [0, 1], or
    uint8 with `as_uint8` (converted on the model's device); `transform` defaults to the manifest's
    (:func:`default_transform`), a random one is seeded by (seed, epoch, sample position). Text shards
    yield (token ids, aligned labels, is_padding), int64 rows of the manifest's ``max_length``.
    """

    def __init__(self, source: ShardSource, rank: int, world: int, shuffle: bool = False, seed: int = 0,
                 buffer: int = 1000, skip_corrupt: bool = False, limit: int | None = None,
                 transform: Transform | None = None, as_uint8: bool = False) -> None:
        self.source, self.rank, self.world = source, rank, world
        self.shuffle, self.seed, self.buffer, self.skip_corrupt = shuffle, seed, buffer, skip_corrupt
        self.transform = transform or default_transform(source.manifest)
        self.as_uint8 = as_uint8
        total = source.total if limit is None else min(limit, source.total)
        self.start, self.stop = rank_range(total, rank, world)
        self.length = math.ceil(total / world)
        self.epoch = 0
        self.stats = ReadStats()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skipped(self, padding_seen: int) -> int:
        """Samples skipped in an epoch that yielded `padding_seen` padding items: skipped samples are replaced
        by padding, so this counts them wherever they were read (DataLoader workers keep their own stats)."""
        return padding_seen - (self.length - (self.stop - self.start))

    def __len__(self) -> int:
        return self.length

    def _worker_slice(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, self.length
        return rank_range(self.length, info.id, info.num_workers)

    def _rng(self, position: int) -> torch.Generator:
        return generator(self.seed, "transform", self.epoch, position)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        lo, hi = self._worker_slice()
        real = self.stop - self.start
        if real == 0:
            raise ShardError(f"rank {self.rank} of {self.world} has no samples: {self.source.total} samples in total")
        # positions [lo, hi) of this rank's padded sequence; those past `real` repeat earlier samples
        real_lo, real_hi = self.start + min(lo, real), self.start + min(hi, real)
        stream = self._padded(real_lo, real_hi, hi - lo)
        if self.shuffle:
            stream = self._shuffled(stream)
        if self.as_uint8 or self.source.manifest.is_text:
            return stream
        return ((img.float() / 255.0, label, pad) for img, label, pad in stream)

    def _range(self, a: int, b: int, stats: ReadStats | None):
        return iter_range(self.source, a, b, self.skip_corrupt, stats, self.transform,
                          self._rng if self.transform.random else None)

    def _padded(self, a: int, b: int, length: int) -> Iterator[tuple[torch.Tensor, int, bool]]:
        """Samples at positions [a, b), then padding (repeats of the first ones, flagged) up to `length`.

        Skipped (corrupt) samples are replaced by padding too, so every rank yields its full length."""
        first: list = []
        produced = 0
        for img, label, _ in self._range(a, b, self.stats):
            if len(first) < 64:
                first.append((img, label))
            produced += 1
            yield img, label, False
        need = length - produced
        if need and not first:
            first = [(img, label) for img, label, _ in self._range(self.start, min(self.stop, self.start + 64), None)]
            if not first:
                raise ShardError(f"rank {self.rank}: every shard in its range is unreadable")
        for k in range(need):
            img, label = first[k % len(first)]
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


def _labels(ys) -> torch.Tensor:
    """A batch's labels: class indices (B,), or a causal LM's aligned label rows stacked (B, T)."""
    return torch.stack(list(ys)) if isinstance(ys[0], torch.Tensor) else torch.tensor(ys, dtype=torch.long)


def _collate(items):
    xs, ys, pads = zip(*items, strict=True)
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) > 1:
        raise ShardError(f"images of different sizes in one batch ({sorted(shapes)[:3]}): read them through a "
                         f"transform to a fixed size (pipeline.transforms)")
    return torch.stack(xs), _labels(ys), torch.tensor(pads, dtype=torch.bool)


def rank_loader(stream: RankStream, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                prefetch_factor: int | None = None) -> DataLoader:
    """Batches of (x, y, is_padding) for this rank; same batch count on every rank.

    With `num_workers`, decoding and transforms run in that many worker processes, each keeping
    `prefetch_factor` batches ready; `pin_memory` (CUDA only) lets batches cross to the GPU
    asynchronously."""
    extra = {"prefetch_factor": prefetch_factor or 2} if num_workers > 0 else {}
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                      persistent_workers=False, pin_memory=pin_memory and torch.cuda.is_available(), **extra)


def read_all(source: ShardSource, limit: int | None = None, transform: Transform | None = None,
             skip_corrupt: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every sample in order as (uint8 images, labels, source indices): for small sets and tests; text
    shards give (token ids (N, T), aligned labels (N, T), source indices). With `skip_corrupt`, malformed
    samples are left out, as a job with ``run.skip_corrupt`` leaves them out."""
    total = source.total if limit is None else min(limit, source.total)
    xs, ys, idx = [], [], []
    for img, label, i in iter_range(source, 0, total, skip_corrupt=skip_corrupt, transform=transform):
        xs.append(img)
        ys.append(label)
        idx.append(i)
    if not xs:
        raise ShardError("no samples read")
    return torch.stack(xs), _labels(ys), torch.tensor(idx)

