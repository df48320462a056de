"""The driver's pre-flight check of a job's shards, before Ray starts.

A bad shard found inside a Ray Train worker costs a cluster start and a stage, and reaches the user
only after that; most are found here in a second or two instead. Every shard's first sample is read
(an empty, garbage or non-tar file, a malformed first sample, an image that does not match the
manifest), and whole shards are read, in order, up to a budget of samples: for a D_val-sized clean set
and a test set of a few thousand images that is all of them, so counts, labels, images and per-shard
SHA-256 are all checked before any worker starts. Larger sets are checked the rest of the way by the
workers' own reader (the same checks, :func:`pipeline.shards.iter_range`), whose errors are not retried
(:mod:`pipeline.failures`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from pipeline.shards import ShardSource, iter_range

FULL_CHECK_SAMPLES = 20_000  # per shard set: read whole shards while the running count stays within this


def check_shards(sources: dict[str, ShardSource], skip_corrupt: bool = False,
                 full_check_samples: int = FULL_CHECK_SAMPLES, threads: int = 4) -> None:
    """Read what the pre-flight reads of each shard set (see the module docstring); the first problem is
    raised as the reader raises it (a one-line ``ShardError`` naming the shard and sample). With
    `skip_corrupt` the job reads past bad samples, so there is nothing to refuse here."""
    if skip_corrupt:
        return
    for source in sources.values():
        ranges, offset = [], 0
        for count in source.counts:
            whole = offset + count <= full_check_samples
            ranges.append((offset, offset + (count if whole else 1)))
            offset += count
        pool = ThreadPoolExecutor(max(1, min(threads, len(ranges))))
        try:
            futures = [pool.submit(_read, source, a, b) for a, b in ranges]
            for f in futures:  # in shard order: the first bad shard is the one named
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _read(source: ShardSource, start: int, stop: int) -> None:
    for _ in iter_range(source, start, stop):
        pass
