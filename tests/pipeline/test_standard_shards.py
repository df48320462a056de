"""Shards written by other tools (webdataset's own TarWriter: jpg + cls, no manifest, no idx): indexed
with `fip shard index`, read with the exact rank split, resized to a fixed size, and accepted by the
job's stages."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shard_index import index_shards
from pipeline.shards import (
    RankStream,
    ReadStats,
    ShardError,
    iter_range,
    open_shards,
    rank_loader,
    read_all,
    train_transform_for,
)

SIZE = 32
COUNTS = (7, 5, 9)


def jpeg(rng, h, w) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_foreign(write, prefix: str, counts=COUNTS, classes=4, seed=0) -> list[tuple[str, int, bytes]]:
    """Shards as another team makes them: webdataset.TarWriter, keys `<synset>_<n>`, jpg + cls only."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    samples = []
    for s, n in enumerate(counts):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for i in range(n):
                label = int(rng.integers(0, classes))
                data = jpeg(rng, *(int(v) for v in rng.integers(20, 60, 2)))
                key = f"n{label:04d}_{s:02d}{i:04d}"
                sink.write({"__key__": key, "jpg": data, "cls": label})
                samples.append((key, label, data))
        write(f"{prefix}{s:06d}.tar", buf.getvalue())
    return samples


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    samples = write_foreign(lambda name, data: (folder / name).write_bytes(data), "imagenet-train-")
    pattern = f"{folder}/imagenet-train-{{000000..000002}}.tar"
    return folder, pattern, samples


def test_without_an_index_the_error_names_the_command(foreign):
    _, pattern, _ = foreign
    with pytest.raises(ShardError, match=r"no index for .*fip shard index"):
        open_shards(pattern)


@pytest.fixture(scope="module")
def foreign_test(tmp_path_factory) -> str:
    """Test shards of the same kind, apart from D_val (a job refuses D_val as its test data), indexed."""
    folder = tmp_path_factory.mktemp("foreign-test")
    write_foreign(lambda name, data: (folder / name).write_bytes(data), "imagenet-val-", counts=(6, 6), seed=1)
    return index_shards(f"{folder}/imagenet-val-{{000000..000001}}.tar", image_size=SIZE, num_classes=4)[0]


@pytest.fixture(scope="module")
def indexed(foreign):
    folder, pattern, samples = foreign
    where, manifest = index_shards(pattern, image_size=SIZE)
    return folder, pattern, samples, where, manifest


def test_index_counts_hashes_and_sizes(indexed):
    import hashlib

    folder, pattern, samples, where, m = indexed
    assert where == f"{folder}/imagenet-train.manifest.json" and m.base is None
    assert [s.count for s in m.shards] == list(COUNTS) and m.count == len(samples)
    assert all(s.sha256 == hashlib.sha256((folder / s.name).read_bytes()).hexdigest() for s in m.shards)
    assert m.variable_size and m.image_shape == [3, SIZE, SIZE] and m.num_classes == 4
    assert m.meta["formats"] == {"jpg": len(samples)}
    src = open_shards(pattern)
    assert src.total == 21 and open_shards(where).total == 21
    assert open_shards(f"{folder}/imagenet-train-{{000001..000002}}.tar").total == 14


@pytest.mark.parametrize("world,loader_workers", [(1, 0), (2, 0), (3, 2), (4, 0)])
def test_exact_rank_split_of_foreign_shards(indexed, world, loader_workers):
    _, pattern, samples, _, _ = indexed
    src = open_shards(pattern)
    x_all, y_all, idx_all = read_all(src)
    assert idx_all.tolist() == list(range(21)) and y_all.tolist() == [s[1] for s in samples]
    reference = sorted((int(y), float(x.float().sum())) for x, y in zip(x_all, y_all))
    seen, batch_counts = [], []
    for rank in range(world):
        batches = list(rank_loader(RankStream(src, rank, world, as_uint8=True), 4, num_workers=loader_workers))
        batch_counts.append(len(batches))
        for x, y, pad in batches:
            assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.uint8
            seen += [(int(v), float(img.float().sum())) for img, v, p in zip(x, y, pad) if not p]
    assert len(set(batch_counts)) == 1
    assert sorted(seen) == reference  # every sample exactly once; the rest is flagged padding


def test_train_transform_is_seeded_by_position_not_by_worker(indexed):
    _, pattern, _, _, m = indexed
    src = open_shards(pattern)
    t = train_transform_for(m)
    assert t is not None and t.mode == "train" and t.size == SIZE

    def epoch(workers, e):
        stream = RankStream(src, 0, 1, seed=3, transform=t, as_uint8=True)
        stream.set_epoch(e)
        images = torch.cat([x for x, _, _ in rank_loader(stream, 5, num_workers=workers)])
        return sorted(img.numpy().tobytes() for img in images)  # workers interleave their batches

    a = epoch(0, 0)
    assert a == epoch(2, 0)  # the same crops whichever worker decodes a sample
    assert a != epoch(0, 1)  # a new epoch draws new crops


def test_index_kept_elsewhere_for_a_read_only_bucket(tmp_path, s3_store, s3_endpoint, capsys):
    from fipcli.main import main

    prefix = "s3://fip-test/foreign/val-"
    samples = write_foreign(lambda name, data: s3_store.write_bytes(name, data), prefix, counts=(4, 6), seed=1)
    pattern = prefix + "{000000..000001}.tar"
    out = tmp_path / "index-cache" / "val.manifest.json"
    assert main(["shard", "index", pattern, "--out", str(out), "--s3-endpoint", s3_endpoint, "--image-size", "24",
                 "--num-classes", "5", "--workers", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == {"index": str(out), "count": 10, "shards": 2, "classes": 5, "image_shape": [3, 24, 24],
                       "variable_size": True}
    assert not s3_store.exists("s3://fip-test/foreign/val.manifest.json")  # nothing written to the bucket
    src = open_shards(str(out), s3_store)
    assert src.manifest.base == "s3://fip-test/foreign" and src.urls[0] == "s3://fip-test/foreign/val-000000.tar"
    x, y, _ = read_all(src)
    assert x.shape == (10, 3, 24, 24) and y.tolist() == [s[1] for s in samples]
    # parallel indexing gives the same index
    _, again = index_shards(pattern, str(tmp_path / "again.manifest.json"), store=s3_store, workers=2, image_size=24,
                            num_classes=5)
    assert [(s.count, s.sha256) for s in again.shards] == [(s.count, s.sha256) for s in src.manifest.shards]


def test_shards_of_one_size_are_read_as_they_are(tmp_path):
    import webdataset as wds

    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (6, 8, 8), dtype=np.uint8)
    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for i, img in enumerate(images):
            png = io.BytesIO()
            Image.fromarray(img).save(png, format="PNG")
            sink.write({"__key__": f"s{i}", "png": png.getvalue(), "cls": i % 3})
    (tmp_path / "grey.tar").write_bytes(buf.getvalue())
    _, m = index_shards(str(tmp_path / "grey.tar"), channels=1)
    assert not m.variable_size and m.image_shape == [1, 8, 8]
    x, y, _ = read_all(open_shards(str(tmp_path / "grey.tar")))
    assert torch.equal(x[:, 0], torch.from_numpy(images)) and y.tolist() == [0, 1, 2, 0, 1, 2]


def test_bad_foreign_samples_are_named(tmp_path):
    import webdataset as wds

    def shard(name, samples):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for s in samples:
                sink.write(s)
        (tmp_path / name).write_bytes(buf.getvalue())

    rng = np.random.default_rng(4)
    shard("nolabel.tar", [{"__key__": "a", "jpg": jpeg(rng, 20, 20)}])
    with pytest.raises(ShardError, match=r"nolabel\.tar: sample 'a' is malformed"):
        index_shards(str(tmp_path / "nolabel.tar"))
    shard("noimage.tar", [{"__key__": "b", "txt": "hello", "cls": 1}])
    with pytest.raises(ShardError, match=r"noimage\.tar: sample 'b' is malformed \(no image"):
        index_shards(str(tmp_path / "noimage.tar"))
    shard("labels.tar", [{"__key__": "c", "jpg": jpeg(rng, 20, 20), "cls": 7}])
    with pytest.raises(ShardError, match="label 7 but only 3 classes"):
        index_shards(str(tmp_path / "labels.tar"), num_classes=3)
    shard("broken.tar", [{"__key__": "d", "jpg": jpeg(rng, 20, 20), "cls": 0},
                         {"__key__": "e", "jpg": b"\xff\xd8\xff not really", "cls": 1},
                         {"__key__": "f", "jpg": jpeg(rng, 20, 20), "cls": 1}])
    with pytest.raises(ValueError, match=r"broken\.tar: sample 'e' is not a readable image"):
        index_shards(str(tmp_path / "broken.tar"))
    # written by hand (e.g. after an index of the healthy shard): the reader names the sample, or skips it
    from pipeline.shardfmt import ShardInfo, ShardManifest

    manifest = ShardManifest("x", "", ["0", "1"], [3, 16, 16], 3, [ShardInfo("broken.tar", 3, "")],
                             {"variable_size": True})
    (tmp_path / "broken.manifest.json").write_text(manifest.to_json())
    src = open_shards(str(tmp_path / "broken.tar"))
    with pytest.raises(ShardError, match=r"broken\.tar: sample 'e' is malformed"):
        list(iter_range(src, 0, 3))
    stats = ReadStats()
    assert [y for _, y, _ in iter_range(src, 0, 3, skip_corrupt=True, stats=stats)] == [0, 1]
    assert stats.skipped == 1 and stats.skipped_shards == [str(tmp_path / "broken.tar")]


def test_images_of_different_sizes_are_not_batched_without_a_transform(indexed):
    from pipeline.transforms import KEEP

    _, pattern, _, _, _ = indexed
    with pytest.raises(ShardError, match=r"is \(3, \d+, \d+\), the manifest says \(3, 32, 32\)"):
        list(iter_range(open_shards(pattern), 0, 5, transform=KEEP))


# ---------------------------------------------------------------- the job's stages on standard shards
def _model(tmp_path, normalization: bool):
    from fip.inputs import IMAGENET_NORMALIZATION, NORMALIZATION_KEY
    from fip.io import save_model
    from fip.models import ModelSpec, build_model

    spec = ModelSpec("preactresnet18", num_classes=4, in_channels=3, image_size=SIZE, width=0.0625)
    torch.manual_seed(0)
    meta = {NORMALIZATION_KEY: IMAGENET_NORMALIZATION.to_metadata()} if normalization else {}
    return str(save_model(build_model(spec), spec, tmp_path / f"suspect-{normalization}.safetensors", meta))


def _config(tmp_path, model: str, clean: str, test: str, **purify):
    from pipeline.config import JobConfig

    return JobConfig.from_dict({
        "inputs": {"model": model, "clean": clean, "test": test},
        "purify": {"iterations": 2, "batch_size": 8, "trace_every": 1, "trace_batch": 4, "eta_f": 1e-4, **purify},
        "resources": {"workers": 1},
        "run": {"work_dir": str(tmp_path / "jobs"), "checkpoint_every": 100},
        "tracking": {"log_to_mlflow": False, "register_as": None},
        "analysis": {"esd_samples": 0},
    })


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_stages_take_standard_shards_in_process(indexed, foreign_test, tmp_path, restore_threads):
    """The Fisher stage and the training batches, in this process (no Ray), on jpg/cls shards."""
    from fip.fisher import FisherDiag
    from pipeline.plan import plan_job
    from pipeline.stages import fisher_stage, step_batches

    folder, pattern, _, _, _ = indexed
    plans = {}
    for norm in (False, True):
        cfg = _config(tmp_path / str(norm), _model(tmp_path, norm), pattern, foreign_test, fisher_kind="true")
        plan = plan_job(cfg)  # the model's (3, 32, 32) matches what the index says readers yield
        metrics = fisher_stage({"context": plan.context})
        assert metrics["fisher_count"] == 21 and "acc_before" in metrics
        plans[norm] = FisherDiag.load(plan.context.fisher_url)
    assert plans[False].count == plans[True].count == 21
    # the suspect normalises its own inputs when its metadata says so: a different Fisher
    assert abs(plans[False].trace() - plans[True].trace()) > 1e-3 * plans[False].trace()
    batches = step_batches(plan.context, 0, 1, 0)
    step, x, y = next(batches)
    assert step == 0 and x.shape == (8, 3, SIZE, SIZE) and x.dtype == torch.float32 and 0 <= x.min() <= x.max() <= 1


@pytest.mark.slow  # Ray Train, two stages: about a minute on 2 cores
def test_purify_job_on_standard_jpeg_shards(ray_session, indexed, foreign_test, tmp_path):
    from fip.inputs import NORMALIZATION_KEY
    from pipeline.driver import run_job
    from pipeline.transforms import TRANSFORM_KEY

    _, pattern, _, _, _ = indexed
    result = run_job(_config(tmp_path, _model(tmp_path, True), pattern, foreign_test))
    assert result.metrics["fisher_count"] == 21 and {"acc_before", "acc_after"} <= set(result.metrics)
    side = json.loads(result.purified_path.with_suffix(".json").read_text())["metadata"]
    assert side[NORMALIZATION_KEY] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert side[TRANSFORM_KEY]["eval"]["mode"] == "eval" and side[TRANSFORM_KEY]["eval"]["resize"] == 37
    assert side[TRANSFORM_KEY]["train"]["mode"] == "train" and side[TRANSFORM_KEY]["train"]["size"] == SIZE
