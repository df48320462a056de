"""Bad shards and manifests, as `fip purify` meets them: each ends in one line naming the shard (and the
sample, or the manifest's field).

Most are refused by the driver's pre-flight (pipeline/validation.py) before Ray starts, so they run
in-process in about a second each and all run in `make test`. The cases a pre-flight cannot see (a set
larger than what it reads whole, broken past that point) run a real local Ray Train job and are marked
`slow`; they also check that such an input error is not retried by `max_failures` and that
`--skip-corrupt` skips the bad samples only and reports their total over both ranks.
"""

import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reliability.harness import Observed, judge_error, run_main

from fip.io import save_model
from fip.models import ModelSpec, build_model
from lab.datasets import ImageSet, load_dataset
from pipeline.shard_writer import write_shards
from pipeline.validation import FULL_CHECK_SAMPLES

Edit = Callable[[str, bytes], tuple[str, bytes] | None]


# ---------------------------------------------------------------- building bad inputs
def model_for(folder: Path, channels: int, size: int, classes: int = 10) -> Path:
    spec = ModelSpec("preactresnet18", num_classes=classes, in_channels=channels, image_size=size, width=0.0625)
    torch.manual_seed(0)
    return save_model(build_model(spec), spec, folder / f"suspect-{channels}x{size}.safetensors")


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def rewrite_tar(path: Path, edit: Edit) -> None:
    """Rewrite the tar at `path` member by member: `edit(name, data)` returns the new (name, data), or None
    to leave the member out."""
    members = []
    with tarfile.open(path) as tar:
        for info in tar:
            members.append((info.name, tar.extractfile(info).read()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            new = edit(name, data)
            if new is None:
                continue
            info = tarfile.TarInfo(new[0])
            info.size = len(new[1])
            tar.addfile(info, io.BytesIO(new[1]))
    path.write_bytes(buf.getvalue())


def member(key: str, ext: str, replacement: Callable[[str, bytes], tuple[str, bytes] | None]) -> Edit:
    """An edit of the one member `<key>.<ext>`; every other member is kept."""
    return lambda name, data: replacement(name, data) if name == f"{key}.{ext}" else (name, data)


def edit_manifest(folder: Path, fn: Callable[[dict], None]) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    fn(m)
    (folder / "manifest.json").write_text(json.dumps(m))


def key_at(folder: Path, shard: int, position: int) -> str:
    with tarfile.open(folder / f"{shard:06d}.tar") as tar:
        return sorted({n.split(".")[0] for n in tar.getnames()})[position]


def webdataset_shard(path: Path, samples: list[dict]) -> None:
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as sink:
        for s in samples:
            sink.write(s)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Good inputs the cases break copies of: digits shards (360 x 1x8x8, six shards of 70 and one of 10
    ... as written) with their model, and third-party jpg/cls shards (3x16x16) with theirs."""
    root = tmp_path_factory.mktemp("bad-data")
    digits = root / "digits"
    write_shards(load_dataset("digits", "test"), str(digits), maxcount=70)
    rng = np.random.default_rng(0)
    foreign = root / "foreign"
    foreign.mkdir()
    for s in range(2):
        webdataset_shard(foreign / f"their-{s:06d}.tar", [
            {"__key__": f"img{s}_{i:03d}", "jpg": _jpeg(rng), "cls": int(rng.integers(0, 10))} for i in range(12)])
    from pipeline.shard_index import index_shards

    index_shards(str(foreign / "their-{000000..000001}.tar"), num_classes=10)
    return {"root": root, "digits": digits, "foreign": foreign, "grey8": model_for(root, 1, 8),
            "rgb16": model_for(root, 3, 16)}


def _jpeg(rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def purify(model: Path, clean: str, tmp: Path, *extra: str) -> Observed:
    return run_main(["purify", "--model", str(model), "--clean", clean, "--iterations", "2", "--batch-size", "16",
                     "--max-failures", "0", "--work-dir", str(tmp / "jobs"), "--esd-samples", "0",
                     "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra])


# ---------------------------------------------------------------- the cases
def _break(name: str, base: dict, tmp: Path) -> tuple[Path, str, tuple[str, ...]]:
    """A broken copy of the good inputs for case `name`: (model, --clean spec, what the error must name)."""
    if name.startswith("foreign_"):
        folder = Path(shutil.copytree(base["foreign"], tmp / "foreign"))
        shard = folder / "their-000001.tar"
        if name == "foreign_missing_cls":
            rewrite_tar(shard, member("img1_005", "cls", lambda n, d: None))
            what = ("their-000001.tar", "img1_005", "cls")
        elif name == "foreign_unknown_image_key":
            rewrite_tar(shard, member("img1_007", "jpg", lambda n, d: ("img1_007.tif", d)))
            what = ("their-000001.tar", "img1_007", "no image")
        return base["rgb16"], str(folder / "their-{000000..000001}.tar"), what
    folder = Path(shutil.copytree(base["digits"], tmp / "digits"))
    shard = folder / "000002.tar"
    model = base["grey8"]
    if name == "truncated_tar":
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 2])
        what = ("000002.tar", "truncated")
    elif name == "empty_file":
        shard.write_bytes(b"")
        what = ("000002.tar",)
    elif name == "garbage_bytes":
        shard.write_bytes(np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
        what = ("000002.tar", "corrupt")
    elif name == "malformed_sample_name":  # a dot in the key: WebDataset reads the field as "x.png"
        key = key_at(folder, 2, 30)
        rewrite_tar(shard, lambda n, d: (n.replace(key + ".", key + ".x.", 1), d))
        what = ("000002.tar", key, "malformed")
    elif name == "label_out_of_range":
        key = key_at(folder, 2, 40)
        rewrite_tar(shard, member(key, "cls", lambda n, d: (n, b"99")))
        what = ("000002.tar", key, "label 99")
    elif name == "mixed_image_sizes":
        key = key_at(folder, 2, 50)
        rewrite_tar(shard, member(key, "png", lambda n, d: (n, png(np.zeros((12, 12), np.uint8)))))
        what = ("000002.tar", key, "(1, 12, 12)")
    elif name == "rgb_behind_grey_manifest":  # same size: only the channels are wrong
        rewrite_tar(shard, lambda n, d: (n, png(np.full((8, 8, 3), (200, 30, 30), np.uint8))) if n.endswith(".png")
                    else (n, d))
        what = ("000002.tar", "colour", "1 channel")
    elif name == "rgb_32_behind_1x28x28_manifest":  # issue 13's case: CIFAR-like shards, an FMNIST manifest
        folder = tmp / "cifar-like"
        rgb = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (40, 3, 32, 32), dtype=np.uint8))
        write_shards(ImageSet(rgb, torch.arange(40) % 10, [str(i) for i in range(10)]), str(folder), maxcount=20)
        edit_manifest(folder, lambda m: m.update(image_shape=[1, 28, 28]))
        model = model_for(tmp, 1, 28)
        what = ("000000.tar", "colour")
    elif name == "manifest_count_lower":
        edit_manifest(folder, lambda m: (m["shards"][2].update(count=60), m.update(count=m["count"] - 10)))
        what = ("000002.tar", "more samples", "60")
    elif name == "manifest_count_higher":
        edit_manifest(folder, lambda m: (m["shards"][2].update(count=80), m.update(count=m["count"] + 10)))
        what = ("000002.tar", "truncated", "80")
    elif name == "manifest_total_disagrees":
        edit_manifest(folder, lambda m: m.update(count=m["count"] + 1))
        what = ("manifest.json", "count")
    elif name == "shard_changed_after_manifest":  # a valid label changed: only the SHA-256 can tell
        key = key_at(folder, 2, 10)
        rewrite_tar(shard, member(key, "cls", lambda n, d: (n, str((int(d) + 1) % 10).encode())))
        what = ("000002.tar", "SHA-256")
    elif name == "manifest_sha256_wrong":
        edit_manifest(folder, lambda m: m["shards"][4].update(sha256="ab" * 32))
        what = ("000004.tar", "SHA-256")
    else:
        raise KeyError(name)
    return model, str(folder), what


CASES = ["truncated_tar", "empty_file", "garbage_bytes", "malformed_sample_name", "label_out_of_range",
         "mixed_image_sizes", "rgb_behind_grey_manifest", "rgb_32_behind_1x28x28_manifest", "manifest_count_lower",
         "manifest_count_higher", "manifest_total_disagrees", "shard_changed_after_manifest", "manifest_sha256_wrong",
         "foreign_missing_cls", "foreign_unknown_image_key"]


@pytest.mark.parametrize("name", CASES)
def test_bad_shards_refused_before_ray(name, base, tmp_path, verdict):
    model, clean, names = _break(name, base, tmp_path)
    obs = purify(model, clean, tmp_path)
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"shards: {name}")
    # refused by the plan: the job folder is made right after Ray starts, before any stage, so it is absent
    assert not (tmp_path / "jobs").exists()


# ---------------------------------------------------------------- past the pre-flight: in the workers
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A clean set the pre-flight cannot read whole: one shard one sample over its budget (digits tiled),
    of which it reads the first sample only."""
    data = load_dataset("digits", "train")
    idx = torch.arange(FULL_CHECK_SAMPLES + 1) % len(data)
    folder = tmp_path_factory.mktemp("big") / "clean"
    write_shards(ImageSet(data.x[idx], data.y[idx], data.classes), str(folder), maxcount=FULL_CHECK_SAMPLES + 1)
    return folder


def _job_config(model: Path, clean: Path, tmp: Path, **run):
    from pipeline.config import JobConfig

    return JobConfig.from_dict({
        "inputs": {"model": str(model), "clean": str(clean)},
        "purify": {"iterations": 2, "batch_size": 16, "fisher_samples": None},
        "resources": {"workers": 2, "cpus_per_worker": 1},
        "run": {"work_dir": str(tmp / "jobs"), **run},
        "tracking": {"log_to_mlflow": False, "register_as": None},
        "analysis": {"esd_samples": 0},
    })


def failed_attempts(path: Path):
    """A Ray Train callback (run on its controller) appending a line to `path` per failed attempt; its
    class is defined here so that Ray pickles it by value (the controller cannot import this test file)."""
    from ray.train import UserCallback

    class FailedAttempts(UserCallback):
        def __init__(self, where: str) -> None:
            self.where = where

        def after_exception(self, run_context, worker_exceptions) -> None:
            with open(self.where, "a") as f:
                f.write(f"{sorted(worker_exceptions)}\n")

    return FailedAttempts(str(path))


@pytest.mark.slow  # Ray Train, 2 workers: about a minute on 2 cores
def test_input_error_in_a_worker_is_one_line_and_not_retried(ray_session, base, big, tmp_path, verdict):
    from pipeline.driver import run_job

    folder = Path(shutil.copytree(big, tmp_path / "clean"))
    key = key_at(folder, 0, 10)  # rank 0's first batch; the pre-flight read only sample 0 of this shard
    rewrite_tar(folder / "000000.tar", member(key, "cls", lambda n, d: (n, b"99")))
    attempts = tmp_path / "attempts.txt"
    obs_err, rc, start = "", 0, time.perf_counter()
    try:
        run_job(_job_config(base["grey8"], folder, tmp_path, max_failures=2), callbacks=[failed_attempts(attempts)])
    except Exception as e:  # the CLI prints exactly this line (fipcli.main)
        obs_err, rc = f"fip purify: error: {e}", 2
    obs = Observed(rc, "", obs_err, time.perf_counter() - start)
    verdict("bad input", "clean error", judge_error(obs, ("000000.tar", key, "label 99", "rank 0")), obs.seconds,
            case="shards: label out of range past the pre-flight, in a worker")
    tries = attempts.read_text().splitlines() if attempts.exists() else []
    assert len(tries) == 1, f"max_failures=2 retried a deterministic input error: {tries}"


@pytest.mark.slow  # Ray Train, 2 workers, both stages: about a minute on 2 cores
def test_skip_corrupt_skips_only_bad_samples_and_counts_both_ranks(ray_session, base, tmp_path, verdict):
    from pipeline.driver import run_job

    folder = Path(shutil.copytree(base["digits"], tmp_path / "digits"))
    bad = {0: [(5, "cls", lambda n, d: None), (20, "png", lambda n, d: (n, b"not a png"))],  # rank 0: [0, 180)
           4: [(3, "cls", lambda n, d: (n, b"99")), (9, "png", lambda n, d: (n.replace(".png", ".x.png"), d)),
               (60, "png", lambda n, d: (n, png(np.zeros((3, 3), np.uint8))))]}  # rank 1: [180, 360)
    for shard, edits in bad.items():
        keys = [key_at(folder, shard, pos) for pos, _, _ in edits]
        for key, (_, ext, fn) in zip(keys, edits, strict=True):
            rewrite_tar(folder / f"{shard:06d}.tar", member(key, ext, fn))
    start = time.perf_counter()
    result = run_job(_job_config(base["grey8"], folder, tmp_path, skip_corrupt=True))
    total = sum(len(e) for e in bad.values())
    got = result.metrics["skipped_samples"], result.metrics["fisher_count"]
    judged = ("recovered", f"skipped {got[0]} of {total} bad samples, Fisher over {got[1]} of {360 - total}") \
        if got == (total, 360 - total) else ("silent wrong", f"skipped_samples {got[0]}, fisher_count {got[1]}; "
                                              f"expected {total} and {360 - total}")
    verdict("bad input", "recovered", judged, time.perf_counter() - start, case="--skip-corrupt: bad samples on both ranks")
