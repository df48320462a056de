"""Manifests for WebDataset shards written by other tools (``fip shard index``): each shard read
through once, in worker processes, for its sample count, SHA-256, labels, formats and image sizes.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import tarfile

from pipeline.shard_tasks import SourceImageError, decode_all, process_pool, progress_bar
from pipeline.shardfmt import (
    HashedStream,
    MalformedSample,
    ShardError,
    ShardInfo,
    ShardManifest,
    SizeTally,
    expand_braces,
    index_name,
    iter_tar_samples,
    manifest_shape,
    parse_sample,
    sniff,
    split_url,
)
from pipeline.storage import Storage, StorageError, StorageSettings, join


def index_shard_task(url: str, settings: StorageSettings) -> dict:
    """Worker entry point: one shard read through once: sample count, SHA-256, labels, formats, sizes."""
    from PIL import Image

    count, lo, hi = 0, None, None
    tally = SizeTally()
    sha = hashlib.sha256()
    stream = HashedStream(Storage(settings).open_read(url), sha)
    try:
        for sample in iter_tar_samples(stream):
            key, image, label, _ = parse_sample(sample, url)
            count += 1
            lo = label if lo is None else min(lo, label)
            hi = label if hi is None else max(hi, label)
            try:
                with Image.open(io.BytesIO(image)) as im:
                    size = im.size
                    decode_all(im)
            except Exception as e:  # noqa: BLE001 (any decoder error: named with the sample)
                raise SourceImageError(f"shard {url}: sample {key!r}", str(e)) from e
            tally.add(sniff(image) or "other", size)
    except (tarfile.TarError, EOFError) as e:
        raise MalformedSample(f"shard {url} is corrupt or truncated: {e}") from e
    finally:
        stream.close()  # hashes the end-of-archive blocks too
    return {"count": count, "sha256": sha.hexdigest(), "min_label": lo, "max_label": hi, "meta": tally.meta()}


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
    store = store or Storage()
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ShardError("nothing to index: pass shard URLs or a brace pattern")
    urls = [u for p in patterns for u in expand_braces(p)]
    folders = {split_url(u)[0] for u in urls}
    if len(folders) != 1:
        raise ShardError(f"shards of one set must share a folder, found {sorted(folders)[:3]}")
    base = folders.pop()
    names = [split_url(u)[1] for u in urls]
    if len(set(names)) != len(names):
        raise ShardError("a shard is listed twice")
    out = out or join(base, index_name(patterns[0]))
    bar = progress_bar(progress, total=len(urls), desc="indexing shards", unit="shard")
    results: dict[str, dict] = {}
    pool = process_pool(workers)
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
            bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
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
    shape, shape_meta = manifest_shape(infos, channels, image_size)
    out_folder = split_url(out)[0]
    manifest = ShardManifest(index_name(patterns[0]).removesuffix(".manifest.json").removesuffix(".json"), "",
                             classes, shape, sum(i.count for i in infos), infos,
                             {"indexed_from": patterns, **shape_meta},
                             base=None if out_folder.rstrip("/") == base.rstrip("/") else base)
    store.write_bytes(out, manifest.to_json().encode())
    return out, manifest
