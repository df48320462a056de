"""Source data that `fip shard` used to accept and a reader refused later (issue 22, class 7): validated
as it is written, naming the source file, with what was left out counted on the terminal and listed in the
manifest.

- unreadable source images (truncated JPEG or PNG, random bytes, an empty file) are left out: the write
  finishes (verdict "recovered"), the warning names the file, and the manifest lists each one under its
  shard's ``meta.skipped``; a folder with no readable image at all is refused;
- an empty class folder is a label with no samples: a one-line warning naming it, and the manifest's
  ``meta.empty_groups``;
- ``--indices`` entries that are not in the source (past its end, negative, repeated, or an index file
  for the train split given with ``--split test``) are refused in one line, up front where the source knows
  its size and at the end otherwise (the shards written so far kept for a resume).

All in-process on a handful of tiny images (well under a second each): they run in `make test`.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from reliability.harness import judge_error, run_main

from lab.datasets import CleanSplit


def _jpeg(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(seed: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BROKEN = {
    "truncated.jpg": lambda: _jpeg(99)[: len(_jpeg(99)) * 2 // 3],
    "truncated.png": lambda: _png(98)[: len(_png(98)) // 2],
    "noise.jpg": lambda: np.random.default_rng(97).bytes(600),
    "empty.jpg": lambda: b"",
}


def _folder(root: Path, classes: dict[str, int], broken: dict[str, str] | None = None) -> Path:
    """An ImageNet-layout folder ``root/train/<class>/<image>``: `classes` maps a class to its number of good
    JPEGs; `broken` maps a file name from BROKEN to the class folder it goes in."""
    base = root / "train"
    for k, (cls, n) in enumerate(classes.items()):
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (base / cls / f"img{i:03d}.jpg").write_bytes(_jpeg(100 * k + i))
    for name, cls in (broken or {}).items():
        (base / cls / name).write_bytes(BROKEN[name]())
    return root


def _shard(argv: list[str], monkeypatch, tmp_path: Path):
    monkeypatch.chdir(tmp_path)
    return run_main(["shard", *argv, "--workers", "1"])


def _manifest(dest: Path) -> dict:
    return json.loads((dest / "manifest.json").read_text())


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_unreadable_source_file_is_left_out_and_named(broken, tmp_path, monkeypatch, verdict):
    root = _folder(tmp_path / "src", {"cat": 3, "dog": 3}, {broken: "dog"})
    dest = tmp_path / "shards"
    obs = _shard(["imagenet-folder", str(dest), "--root", str(root), "--maxcount", "4"], monkeypatch, tmp_path)
    manifest = _manifest(dest) if (dest / "manifest.json").exists() else None
    listed = [e for s in (manifest or {}).get("shards", []) for e in s["meta"].get("skipped", [])]
    good = (obs.rc == 0 and obs.exception is None and manifest is not None and manifest["count"] == 6
            and manifest["meta"].get("skipped") == 1 and len(listed) == 1 and listed[0]["path"].endswith(broken)
            and broken in obs.err and "left out 1 unreadable" in obs.err)
    detail = obs.err.strip().splitlines()[-1] if obs.err.strip() else f"exit {obs.rc}"
    verdict("bad input", "recovered", ("recovered" if good else "silent wrong", detail), obs.seconds,
            case=f"fip shard imagenet-folder with {broken}")


def test_no_readable_image_is_refused(tmp_path, monkeypatch, verdict):
    root = tmp_path / "src"
    for name in ("truncated.jpg", "noise.jpg"):
        (root / "train" / "only").mkdir(parents=True, exist_ok=True)
        (root / "train" / "only" / name).write_bytes(BROKEN[name]())
    dest = tmp_path / "shards"
    obs = _shard(["imagenet-folder", str(dest), "--root", str(root)], monkeypatch, tmp_path)
    verdict("bad input", "clean error", judge_error(obs, ("no readable image", "unreadable")), obs.seconds)
    assert not (dest / "manifest.json").exists()


def test_empty_class_folder_is_named(tmp_path, monkeypatch, verdict):
    root = _folder(tmp_path / "src", {"ant": 2, "bee": 0, "cow": 2})
    dest = tmp_path / "shards"
    obs = _shard(["imagenet-folder", str(dest), "--root", str(root)], monkeypatch, tmp_path)
    manifest = _manifest(dest) if (dest / "manifest.json").exists() else {}
    good = (obs.rc == 0 and manifest.get("classes") == ["ant", "bee", "cow"] and manifest.get("count") == 4
            and manifest["meta"].get("empty_groups") == ["bee"] and "no samples" in obs.err and "bee" in obs.err)
    detail = obs.err.strip().splitlines()[-1] if obs.err.strip() else f"exit {obs.rc}"
    verdict("bad input", "recovered", ("recovered" if good else "silent wrong", detail), obs.seconds)


def _index_file(path: Path, dataset: str, indices: list[int]) -> Path:
    return CleanSplit(dataset, indices, 0, 1).save(path)


@pytest.mark.parametrize("case, indices, split, names", [
    ("past the end", [0, 5, 100_000], "train", ("past the end", "100000")),
    ("negative", [-3, 4], "train", (">= 0", "-3")),
    ("repeated", [1, 2, 2, 7], "train", ("repeat", "1 entries")),
    ("train indices on the test split", [1, 2], "test", ("train split", "test")),
])
def test_indices_outside_the_source(case, indices, split, names, tmp_path, monkeypatch, verdict):
    index = _index_file(tmp_path / "dval.json", "digits", indices)
    dest = tmp_path / "shards"
    obs = _shard(["digits", str(dest), "--split", split, "--indices", str(index)], monkeypatch, tmp_path)
    verdict("bad input", "clean error", judge_error(obs, names), obs.seconds, case=f"fip shard --indices ({case})")
    assert not (dest / "manifest.json").exists()


def test_indices_past_a_streamed_folder(tmp_path, monkeypatch, verdict):
    """A folder's size is known only once it is listed: the check comes at the end, and the shards written
    so far stay in the partial manifest."""
    root = _folder(tmp_path / "src", {"cat": 3, "dog": 3})
    index = _index_file(tmp_path / "dval.json", "imagenet-folder", [0, 4, 60])
    dest = tmp_path / "shards"
    obs = _shard(["imagenet-folder", str(dest), "--root", str(root), "--indices", str(index)], monkeypatch, tmp_path)
    verdict("bad input", "clean error", judge_error(obs, ("1 of the 3 indices", "60")), obs.seconds,
            case="fip shard imagenet-folder --indices (past the end)")
    assert not (dest / "manifest.json").exists() and (dest / "manifest.partial.json").exists()


def test_good_indices_still_write(tmp_path, monkeypatch):
    index = _index_file(tmp_path / "dval.json", "digits", [0, 3, 9, 1436])
    dest = tmp_path / "shards"
    obs = _shard(["digits", str(dest), "--indices", str(index)], monkeypatch, tmp_path)
    assert obs.rc == 0, obs.err
    assert _manifest(dest)["count"] == 4
