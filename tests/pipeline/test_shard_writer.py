"""The streaming shard writer: source bytes kept, D_val chosen while streaming, bounded buffering,
resume after an interruption, CIFAR-10 batches, S3, and the `fip shard` command."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.shard_sources import DvalSplit, Source, cifar10_source, folder_source
from pipeline.shard_writer import write_source
from pipeline.shardfmt import PARTIAL_MANIFEST, ShardError
from pipeline.shards import open_shards, read_all


def make_folder(root, classes=3, per_class=10, seed=0, size=(24, 40), extra=True):
    """An ImageNet-layout folder of JPEGs of varying size (plus one PNG and one PPM when `extra`)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / "train" / f"n{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(size[0], size[1], 2))
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"img{i:04d}.JPEG", quality=90)
    if extra:
        Image.fromarray(rng.integers(0, 255, (30, 20, 3), dtype=np.uint8)).save(root / "train" / "n0000" / "zz.png")
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / "train" / "n0001" / "zz.ppm")
    return root


def tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_source_jpeg_bytes_are_kept_and_other_formats_become_png(tmp_path):
    root = make_folder(tmp_path / "inet")
    result = write_source(folder_source(root, "train"), str(tmp_path / "out"), maxcount=7)
    m = result.manifests[str(tmp_path / "out")]
    assert m.count == 32 and [s.count for s in m.shards] == [7, 7, 7, 7, 4]
    assert m.variable_size and m.image_shape == [3, 224, 224] and m.meta["formats"] == {"jpg": 30, "png": 2}
    members = {}
    for s in m.shards:
        members.update(tar_members((tmp_path / "out" / s.name).read_bytes()))
    files = sorted(p for p in (root / "train").rglob("*") if p.is_file())
    for index, path in enumerate(files):  # source order: classes sorted, files sorted
        key = f"{index:09d}"
        assert members[f"{key}.cls"] == str(int(path.parent.name[1:])).encode()
        if path.suffix == ".JPEG":
            assert members[f"{key}.jpg"] == path.read_bytes()
        elif path.suffix == ".png":
            assert members[f"{key}.png"] == path.read_bytes()
        else:  # PPM: stored as lossless PNG with the same pixels
            png = Image.open(io.BytesIO(members[f"{key}.png"]))
            assert np.array_equal(np.asarray(png), np.asarray(Image.open(path)))
    # the manifest's SHA-256 is the file's
    import hashlib

    assert all(hashlib.sha256((tmp_path / "out" / s.name).read_bytes()).hexdigest() == s.sha256 for s in m.shards)
    x, y, idx = read_all(open_shards(str(tmp_path / "out")))
    assert x.shape == (32, 3, 224, 224) and idx.tolist() == list(range(32))


def test_dval_is_chosen_while_streaming_per_class_and_seeded(tmp_path):
    root = make_folder(tmp_path / "inet", classes=4, per_class=20, extra=False)
    a = write_source(folder_source(root), str(tmp_path / "d1"), maxcount=16, dval=DvalSplit(0.1, 7),
                     rest=str(tmp_path / "r1"))
    b = write_source(folder_source(root), str(tmp_path / "d2"), maxcount=16, dval=DvalSplit(0.1, 7))
    c = write_source(folder_source(root), str(tmp_path / "d3"), maxcount=16, dval=DvalSplit(0.1, 8))
    dval = read_all(open_shards(str(tmp_path / "d1")))
    rest = read_all(open_shards(str(tmp_path / "r1")))
    assert np.bincount(dval[1].numpy()).tolist() == [2, 2, 2, 2]  # 10 % of each class
    assert sorted(dval[2].tolist() + rest[2].tolist()) == list(range(80))  # disjoint, and nothing lost
    assert read_all(open_shards(str(tmp_path / "d2")))[2].tolist() == dval[2].tolist()  # same seed, same D_val
    assert read_all(open_shards(str(tmp_path / "d3")))[2].tolist() != dval[2].tolist()
    meta = a.manifests[str(tmp_path / "d1")].meta["dval"]
    assert meta == {"fraction": 0.1, "seed": 7, "role": "dval", "count": 8}
    assert a.manifests[str(tmp_path / "r1")].meta["dval"]["role"] == "rest" and b.stats.samples == c.stats.samples == 8


def test_writing_4n_images_buffers_no_more_than_n(tmp_path):
    """What the writer holds (open shards + queued/in-flight shards) is bounded by maxcount and the
    queue, not by the data set: the same bound at N and 4N, far below 4N."""
    maxcount, workers = 8, 2
    bound = (2 * workers + 1) * maxcount
    peaks = []
    for n_per_class in (12, 48):  # N = 48 and 4N = 192 images over 4 classes
        root = make_folder(tmp_path / f"inet{n_per_class}", classes=4, per_class=n_per_class, size=(16, 24),
                           extra=False)
        r = write_source(folder_source(root), str(tmp_path / f"out{n_per_class}"), maxcount=maxcount, workers=workers)
        assert r.stats.samples == 4 * n_per_class and r.stats.shards_written == 4 * n_per_class // maxcount
        # workers import neither torch nor webdataset (about 250 MB each): a few tens of MB (None off Linux)
        assert r.stats.peak_worker_rss_mb is None or r.stats.peak_worker_rss_mb < 150, r.stats.peak_worker_rss_mb
        peaks.append(r.stats.peak_buffered)
    assert all(maxcount <= p <= bound for p in peaks), peaks
    assert peaks[1] <= bound < 192
    # the same bytes whatever the number of processes: shard tars are deterministic
    inline = write_source(folder_source(tmp_path / "inet12"), str(tmp_path / "inline"), maxcount=maxcount)
    assert [s.sha256 for s in inline.manifests[str(tmp_path / "inline")].shards] == \
           [s.sha256 for s in open_shards(str(tmp_path / "out12")).manifest.shards]


class Interrupted(RuntimeError):
    pass


def failing(source: Source, after_groups: int) -> Source:
    """The same source, dying (as a lost disk or a kill would) after `after_groups` groups."""

    def groups():
        for k, group in enumerate(source.groups()):
            if k == after_groups:
                raise Interrupted("source lost")
            yield group

    return Source(source.name, source.split, source.classes, source.channels, groups, source.fixed_shape,
                  source.image_size, source.root, source.describe)


def test_interrupted_write_resumes_with_the_shards_not_yet_written(tmp_path):
    root = make_folder(tmp_path / "inet", classes=6, per_class=10, extra=False)
    dest = tmp_path / "out"
    with pytest.raises(Interrupted):
        write_source(failing(folder_source(root), 3), str(dest), maxcount=4, save_every=0)
    assert not (dest / "manifest.json").exists() and (dest / PARTIAL_MANIFEST).exists()
    with pytest.raises(ShardError, match="interrupted write"):
        open_shards(str(dest))
    partial = json.loads((dest / PARTIAL_MANIFEST).read_text())
    assert [s["name"] for s in partial["shards"]] == [f"{i:06d}.tar" for i in range(7)]  # 30 samples: 7 whole shards
    (dest / "000006.tar").unlink()  # a shard recorded but lost since: written again
    resumed = write_source(folder_source(root), str(dest), maxcount=4)
    assert resumed.stats.shards_reused == 6 and resumed.stats.shards_written == 9
    fresh = write_source(folder_source(root), str(tmp_path / "fresh"), maxcount=4)
    got, want = resumed.manifests[str(dest)], fresh.manifests[str(tmp_path / "fresh")]
    assert [(s.name, s.count, s.sha256) for s in got.shards] == [(s.name, s.count, s.sha256) for s in want.shards]
    assert not (dest / PARTIAL_MANIFEST).exists()
    # a finished write rerun writes nothing; a changed source rewrites only the shards it changes
    assert write_source(folder_source(root), str(dest), maxcount=4).stats.shards_written == 0
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(root / "train" / "n0005" / "img0009.JPEG")
    again = write_source(folder_source(root), str(dest), maxcount=4)
    assert again.stats.shards_written == 1 and again.stats.shards_reused == 14


def test_another_write_at_the_destination_is_refused_unless_overwrite(tmp_path):
    root = make_folder(tmp_path / "inet", extra=False)
    write_source(folder_source(root), str(tmp_path / "out"), maxcount=8)
    with pytest.raises(ShardError, match="already holds shards of another write"):
        write_source(folder_source(root), str(tmp_path / "out"), maxcount=5)
    r = write_source(folder_source(root), str(tmp_path / "out"), maxcount=5, overwrite=True)
    assert [s.count for s in r.manifests[str(tmp_path / "out")].shards] == [5] * 6
    assert open_shards(str(tmp_path / "out")).total == 30


def test_cifar10_batches_stream_one_file_at_a_time(tmp_path):
    from lab.datasets import read_cifar10

    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1", 30), ("data_batch_2", 25), ("test_batch", 10)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         b"labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    r = write_source(cifar10_source(tmp_path, "train"), str(tmp_path / "out"), maxcount=20, workers=2)
    m = r.manifests[str(tmp_path / "out")]
    assert m.image_shape == [3, 32, 32] and not m.variable_size and m.meta["formats"] == {"png": 55}
    x, y, idx = read_all(open_shards(str(tmp_path / "out")))
    ref = read_cifar10(tmp_path, "train")
    assert np.array_equal(x.numpy(), ref.x.numpy()) and y.tolist() == ref.y.tolist() and idx.tolist() == list(range(55))


def test_s3_destination_keeps_bytes_and_resumes(tmp_path, s3_store):
    root = make_folder(tmp_path / "inet", extra=False)
    dest = "s3://fip-test/writer/inet"
    r = write_source(folder_source(root), dest, maxcount=8, workers=2, store=s3_store, dval=DvalSplit(0.2, 0),
                     rest="s3://fip-test/writer/rest")
    assert r.manifests[dest].count == 6 and r.manifests["s3://fip-test/writer/rest"].count == 24
    src = open_shards(dest, s3_store)
    members = tar_members(s3_store.read_bytes(src.urls[0]))
    jpgs = {k: v for k, v in members.items() if k.endswith(".jpg")}
    files = sorted(p for p in (root / "train").rglob("*.JPEG"))
    assert len(jpgs) == 6 and all(v == files[int(k.split(".")[0])].read_bytes() for k, v in jpgs.items())
    again = write_source(folder_source(root), dest, maxcount=8, workers=2, store=s3_store, dval=DvalSplit(0.2, 0),
                         rest="s3://fip-test/writer/rest")
    assert again.stats.shards_written == 0 and again.stats.shards_reused == 1 + 3


def test_fip_shard_command_streams_a_folder_and_resumes(tmp_path, capsys):
    from fipcli.main import main

    root = make_folder(tmp_path / "inet", extra=False)
    args = ["shard", "imagenet-folder", str(tmp_path / "dval"), "--root", str(root), "--dval-fraction", "0.1",
            "--rest", str(tmp_path / "rest"), "--maxcount", "8", "--workers", "1", "--image-size", "64"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out[str(tmp_path / "dval")]["count"] == 3 and out[str(tmp_path / "rest")]["count"] == 27
    assert out["shards_written"] == 1 + 4
    assert open_shards(str(tmp_path / "rest")).manifest.image_shape == [3, 64, 64]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards_reused"] == 5
    assert main(["shard", "imagenet-folder", str(tmp_path / "x"), "--root", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["shard", "digits", str(tmp_path / "y"), "--rest", str(tmp_path / "z")]) == 2
    assert "--rest needs --dval-fraction" in capsys.readouterr().err
