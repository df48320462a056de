"""Shards: lossless round trip, exact split across ranks and loader workers, and bad shards."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from lab.datasets import load_dataset
from pipeline.shard_writer import write_shards
from pipeline.shards import (
    RankStream,
    ShardError,
    expand_braces,
    iter_range,
    open_shards,
    rank_loader,
    read_all,
)


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory):
    data = load_dataset("digits", "test")  # 360 images
    dest = tmp_path_factory.mktemp("shards") / "digits"
    manifest = write_shards(data, str(dest), maxcount=70, indices=np.arange(1000, 1000 + len(data)))
    return data, dest, manifest


def test_round_trip_is_lossless_with_manifest(digits_shards):
    data, dest, manifest = digits_shards
    assert [s.count for s in manifest.shards] == [70, 70, 70, 70, 70, 10]
    assert sorted(p.name for p in dest.iterdir())[:2] == ["000000.tar", "000001.tar"]
    x, y, idx = read_all(open_shards(str(dest)))
    assert torch.equal(x, data.x) and torch.equal(y, data.y)
    assert idx.tolist() == list(range(1000, 1000 + len(data)))
    m = json.loads((dest / "manifest.json").read_text())
    assert m["count"] == 360 and m["image_shape"] == [1, 8, 8] and len(m["shards"][0]["sha256"]) == 64


def test_brace_patterns(digits_shards):
    _, dest, _ = digits_shards
    assert expand_braces("a/{000008..000010}.tar") == ["a/000008.tar", "a/000009.tar", "a/000010.tar"]
    src = open_shards(f"{dest}/{{000001..000002}}.tar")
    assert src.total == 140
    x, y, idx = read_all(src)
    assert idx.tolist() == list(range(1070, 1210))


@pytest.mark.parametrize("world,loader_workers", [(1, 0), (2, 0), (3, 2), (4, 0), (7, 2)])
def test_every_sample_once_and_equal_batches_per_rank(digits_shards, world, loader_workers):
    _, dest, _ = digits_shards
    src = open_shards(str(dest))
    seen, batch_counts, sample_counts = [], [], []
    for rank in range(world):
        stream = RankStream(src, rank, world)
        batches = list(rank_loader(stream, 16, num_workers=loader_workers))
        batch_counts.append(len(batches))
        sample_counts.append(sum(len(b[1]) for b in batches))
        for x, y, pad in batches:
            seen += [(int(v), float(img.sum())) for img, v, p in zip(x, y, pad) if not p]
    assert len(set(batch_counts)) == 1 and len(set(sample_counts)) == 1
    assert len(seen) == 360  # each real sample exactly once; the rest is flagged padding
    x, y, _ = read_all(src)
    assert sorted(seen) == sorted((int(v), float((img.float() / 255).sum())) for img, v in zip(x, y))


def test_shuffle_is_seeded_and_keeps_the_set(digits_shards):
    _, dest, _ = digits_shards
    src = open_shards(str(dest))
    a = [int(y) for _, y, _ in RankStream(src, 0, 2, shuffle=True, seed=1, buffer=50)]
    b = [int(y) for _, y, _ in RankStream(src, 0, 2, shuffle=True, seed=1, buffer=50)]
    plain = [int(y) for _, y, _ in RankStream(src, 0, 2)]
    assert a == b and a != plain and sorted(a) == sorted(plain)


def _copy_shards(src_dir, dst_dir):
    dst_dir.mkdir()
    for p in src_dir.iterdir():
        (dst_dir / p.name).write_bytes(p.read_bytes())
    return dst_dir


def test_truncated_shard_is_named_or_counted(digits_shards, tmp_path):
    _, dest, _ = digits_shards
    bad = _copy_shards(dest, tmp_path / "bad")
    raw = (bad / "000002.tar").read_bytes()
    (bad / "000002.tar").write_bytes(raw[: len(raw) // 2])
    src = open_shards(str(bad))
    with pytest.raises(ShardError, match=r"000002\.tar"):
        list(iter_range(src, 0, src.total))
    # skip mode: the lost samples are counted, and every rank still yields its full length
    stream = RankStream(src, 0, 1, skip_corrupt=True)
    items = list(stream)
    assert len(items) == 360
    assert 0 < stream.stats.skipped <= 70 and stream.stats.skipped_shards == [str(bad / "000002.tar")]
    assert sum(1 for _, _, pad in items if pad) == stream.stats.skipped


def test_garbage_and_empty_shards(digits_shards, tmp_path):
    _, dest, _ = digits_shards
    bad = _copy_shards(dest, tmp_path / "junk")
    (bad / "000001.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(ShardError, match=r"000001\.tar is corrupt or truncated"):
        list(iter_range(open_shards(str(bad)), 0, 360))
    (bad / "000001.tar").write_bytes(b"")
    with pytest.raises(ShardError, match=r"000001\.tar"):
        list(iter_range(open_shards(str(bad)), 0, 360))
    m = json.loads((bad / "manifest.json").read_text())
    m["count"] -= m["shards"][3]["count"]  # a manifest that contradicts itself is refused before this
    m["shards"][3]["count"] = 0
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=r"000003\.tar is empty"):
        open_shards(str(bad))
    with pytest.raises(ShardError, match="no shard manifest"):
        open_shards(str(tmp_path / "nowhere"))


def test_malformed_sample_names_shard(tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("000000001.png", b"not a png"), ("000000001.cls", b"3"), ("000000001.idx", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (d / "000000.tar").write_bytes(buf.getvalue())
    (d / "manifest.json").write_text(json.dumps({"dataset": "x", "split": "test", "classes": ["a"] * 10,
                                                 "image_shape": [1, 8, 8], "count": 1,
                                                 "shards": [{"name": "000000.tar", "count": 1, "sha256": ""}]}))
    with pytest.raises(ShardError, match=r"000000\.tar: sample '000000001' is malformed"):
        read_all(open_shards(str(d)))
