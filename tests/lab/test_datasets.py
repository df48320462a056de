"""Readers tested on small fixtures written in each exact format, and the defender's clean split."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from lab.datasets import (
    CleanSplit,
    DatasetError,
    clean_split,
    load_dataset,
    read_cifar10,
    read_fashion_mnist,
    read_gtsrb,
    read_image_folder,
    without,
)


def _idx(path, arr, gz):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_reader(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 255, (7, 28, 28)), rng.integers(0, 10, 7)
    _idx(tmp_path / "t10k-images-idx3-ubyte", imgs, gz)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz)
    ds = read_fashion_mnist(tmp_path, "test")
    assert ds.x.shape == (7, 1, 28, 28) and torch.equal(ds.x[:, 0], torch.from_numpy(imgs.astype(np.uint8)))
    assert ds.y.tolist() == labels.tolist() and ds.classes[9] == "Ankle boot"


def test_idx_with_wrong_size_or_magic_is_refused(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 10)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(5), False)
    with pytest.raises(DatasetError, match="IDX header says 3920 bytes of data, found 10"):
        read_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"GIF89a...")
    with pytest.raises(DatasetError, match="not an unsigned-byte IDX file"):
        read_fashion_mnist(tmp_path, "test")
    with pytest.raises(DatasetError, match="does not exist"):
        read_fashion_mnist(tmp_path / "missing")


def test_real_fashion_mnist_is_installed():
    """The project's setup installs Debian's dataset-fashion-mnist; the demo and benchmarks need it."""
    ds = load_dataset("fashion-mnist", "test")
    assert ds.x.shape == (10000, 1, 28, 28) and ds.y.bincount().tolist() == [1000] * 10


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 5)):
        batch = {b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(tmp_path / name, "wb") as f:
            pickle.dump(batch, f)
    with open(tmp_path / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    train, test = read_cifar10(tmp_path, "train"), read_cifar10(tmp_path, "test")
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (5, 3, 32, 32)
    assert train.classes[3] == "c3"
    raw = pickle.load(open(tmp_path / "data_batch_1", "rb"))
    assert torch.equal(train.x[0], torch.from_numpy(raw[b"data"][0].reshape(3, 32, 32)))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/fip-cifar-pwned",))


def test_cifar_batch_that_runs_code_is_refused(tmp_path):
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": [1]}, f)
    with pytest.raises(DatasetError, match="refusing to load global"):
        read_cifar10(tmp_path, "test")
    assert not os.path.exists("/tmp/fip-cifar-pwned")


def test_image_folder_and_gtsrb_layouts(tmp_path):
    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            d = tmp_path / "inet" / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / f"{i}.png")
    train = read_image_folder(tmp_path / "inet", "train", image_size=16)
    assert train.x.shape == (4, 3, 16, 16) and train.classes == ["cat", "dog"] and train.y.tolist() == [0, 0, 1, 1]
    assert len(read_image_folder(tmp_path / "inet", "test", image_size=16)) == 4  # 'val' serves as test

    g = tmp_path / "gtsrb"
    for cls in ("00000", "00002"):
        (g / "Final_Training" / "Images" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (35, 33, 3), dtype=np.uint8)).save(g / "Final_Training" / "Images" / cls / "a.ppm")
    t = g / "Final_Test" / "Images"
    t.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (31, 30, 3), dtype=np.uint8)).save(t / "00000.ppm")
    (t / "GT-final_test.csv").write_text("Filename;Width;Height;ClassId\n00000.ppm;30;31;7\n")
    tr, te = read_gtsrb(g, "train"), read_gtsrb(g, "test")
    assert tr.y.tolist() == [0, 2] and tr.x.shape == (2, 3, 32, 32) and te.y.tolist() == [7] and len(tr.classes) == 43


def test_unknown_names_and_bad_paths():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist-9'; known: cifar10, digits, fashion-mnist"):
        load_dataset("mnist-9")
    with pytest.raises(DatasetError, match="has no default location"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match="no data_batch_1 under"):
        read_cifar10("/tmp", "train")


def test_clean_split_is_balanced_seeded_and_held_out(tmp_path):
    train = load_dataset("digits", "train")
    s = clean_split(train, fraction=0.05, seed=3, dataset="digits")
    counts = train.y[s.indices].bincount(minlength=10)
    assert counts.min() == counts.max() == s.per_class
    assert clean_split(train, 0.05, 3).indices == s.indices and clean_split(train, 0.05, 4).indices != s.indices
    rest, keep = without(train, s)
    assert len(rest) == len(train) - len(s.indices) and not set(keep) & set(s.indices)
    back = CleanSplit.load(s.save(tmp_path / "dval.json"))
    assert back.indices == s.indices and back.digest == s.digest
    with pytest.raises(DatasetError, match=r"clean fraction must be in \(0, 1\)"):
        clean_split(train, 1.5)
