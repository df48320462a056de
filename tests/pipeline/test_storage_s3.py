"""Shards and files on a real S3 endpoint (moto's server on loopback), and S3 failures."""

import time

import pytest
import torch

from lab.datasets import load_dataset
from pipeline import storage
from pipeline.shards import open_shards, read_all, write_shards


def test_shards_round_trip_through_s3(s3_endpoint):
    data = load_dataset("digits", "test").subset(range(100))
    write_shards(data, "s3://fip-test/unit/digits", maxcount=30)
    src = open_shards("s3://fip-test/unit/digits")
    assert src.urls[0] == "s3://fip-test/unit/digits/000000.tar" and src.total == 100
    x, y, _ = read_all(src)
    assert torch.equal(x, data.x) and torch.equal(y, data.y)
    # the brace form resolves against the manifest beside it
    assert open_shards("s3://fip-test/unit/digits/{000000..000001}.tar").total == 60


def test_plain_webdataset_reads_s3_through_our_opener(s3_endpoint):
    import webdataset as wds

    data = load_dataset("digits", "test").subset(range(20))
    write_shards(data, "s3://fip-test/wds/digits", maxcount=20)
    storage.register_webdataset_s3()
    samples = list(wds.WebDataset("s3://fip-test/wds/digits/000000.tar", shardshuffle=False))
    assert len(samples) == 20 and int(samples[0]["cls"]) == int(data.y[0])


def test_missing_object_names_the_url(s3_endpoint):
    with pytest.raises(storage.StorageError, match="s3://fip-test/nope/manifest.json"):
        storage.read_bytes("s3://fip-test/nope/manifest.json")


def test_unreachable_endpoint_is_retried_then_named(monkeypatch):
    monkeypatch.setenv("FIP_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    calls = []
    original = storage.s3_client

    def counting_client():
        calls.append(time.monotonic())
        return original()

    monkeypatch.setattr(storage, "s3_client", counting_client)
    with pytest.raises(storage.StorageError, match=r"reading s3://fip-test/a/b.tar: failed after 4 attempts"):
        storage.read_bytes("s3://fip-test/a/b.tar")
    assert len(calls) == 4 and calls[-1] - calls[0] >= 0.2 + 0.4 + 0.8  # exponential backoff between tries
