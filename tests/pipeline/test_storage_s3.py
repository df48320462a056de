"""Shards and files on a real S3 endpoint (moto's server on loopback), and S3 failures."""

import time

import pytest
import torch

from lab.datasets import load_dataset
from pipeline.shard_writer import write_shards
from pipeline.shards import open_shards, read_all
from pipeline.storage import Storage, StorageError, StorageSettings, register_webdataset_s3


def test_shards_round_trip_through_s3(s3_store):
    data = load_dataset("digits", "test").subset(range(100))
    write_shards(data, "s3://fip-test/unit/digits", maxcount=30, store=s3_store)
    src = open_shards("s3://fip-test/unit/digits", s3_store)
    assert src.urls[0] == "s3://fip-test/unit/digits/000000.tar" and src.total == 100
    x, y, _ = read_all(src)
    assert torch.equal(x, data.x) and torch.equal(y, data.y)
    # the brace form resolves against the manifest beside it
    assert open_shards("s3://fip-test/unit/digits/{000000..000001}.tar", s3_store).total == 60


def test_put_file_and_delete_on_s3_and_disk(s3_store, tmp_path):
    src = tmp_path / "shard.tar"
    src.write_bytes(bytes(range(256)) * 64)
    for url in ("s3://fip-test/unit/put/shard.tar", str(tmp_path / "out" / "shard.tar")):
        s3_store.put_file(url, src)
        assert s3_store.read_bytes(url) == src.read_bytes()
        s3_store.delete(url)
        assert not s3_store.exists(url)
        s3_store.delete(url)  # already gone: no error


def test_plain_webdataset_reads_s3_through_our_opener(s3_store):
    import webdataset as wds

    data = load_dataset("digits", "test").subset(range(20))
    write_shards(data, "s3://fip-test/wds/digits", maxcount=20, store=s3_store)
    register_webdataset_s3(s3_store)
    samples = list(wds.WebDataset("s3://fip-test/wds/digits/000000.tar", shardshuffle=False))
    assert len(samples) == 20 and int(samples[0]["cls"]) == int(data.y[0])


def test_missing_object_names_the_url(s3_store):
    with pytest.raises(StorageError, match="s3://fip-test/nope/manifest.json"):
        s3_store.read_bytes("s3://fip-test/nope/manifest.json")


def test_two_handles_reach_two_endpoints_in_one_process(s3_store, s3_endpoint):
    """No endpoint in the environment: each handle talks to its own, so jobs cannot cross."""
    elsewhere = Storage(StorageSettings(s3_endpoint="http://127.0.0.1:9", s3_retries=1))
    s3_store.write_bytes("s3://fip-test/handles/a.txt", b"here")
    assert s3_store.read_bytes("s3://fip-test/handles/a.txt") == b"here"
    with pytest.raises(StorageError, match="failed after 1 attempts"):
        elsewhere.read_bytes("s3://fip-test/handles/a.txt")


def test_unreachable_endpoint_is_retried_then_named(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    store = Storage(StorageSettings(s3_endpoint="http://127.0.0.1:9"))  # nothing listens on the discard port
    calls = []
    original = store.s3_client

    def counting_client():
        calls.append(time.monotonic())
        return original()

    monkeypatch.setattr(store, "s3_client", counting_client)
    with pytest.raises(StorageError, match=r"reading s3://fip-test/a/b.tar: failed after 4 attempts"):
        store.read_bytes("s3://fip-test/a/b.tar")
    assert len(calls) == 4 and calls[-1] - calls[0] >= 0.2 + 0.4 + 0.8  # exponential backoff between tries


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="s3_endpoint must be an http"):
        StorageSettings(s3_endpoint="127.0.0.1:9000")
    with pytest.raises(ValueError, match="s3_retries must be >= 1"):
        StorageSettings(s3_retries=0)
