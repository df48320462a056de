"""What the shard writer (:mod:`pipeline.shard_writer`) reads: a data set as small groups of samples
whatever its size (one class folder of an image folder, one CIFAR-10 batch file, one in-memory
lab set, or a block of tokenised JSONL records, :mod:`pipeline.text_source`), and the defender's
clean set D_val chosen within each group while they stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.shardfmt import CLASSIFICATION, TokenizerInfo

if TYPE_CHECKING:
    from lab.datasets import ImageSet


@dataclass
class Sample:
    """One sample on its way into a shard: a source file stored as it is, raw pixels stored as PNG, or a
    tokenised text record stored as JSON (its label is then 0: text has no classes)."""

    index: int
    label: int
    path: str | None = None
    pixels: np.ndarray | None = None  # uint8 (C, H, W)
    text: tuple[list[int], list[int], str] | None = None  # (prompt ids, response ids, where it came from)

    def digest_part(self, root: str) -> bytes:
        """What identifies this sample in its shard's resume digest (a text record: its token ids)."""
        if self.text is not None:
            return f"{self.index}:".encode() + hashlib.sha256(json.dumps(self.text[:2]).encode()).digest()
        if self.path is not None:
            rel = os.path.relpath(self.path, root) if root else self.path
            return f"{self.index}:{self.label}:{rel}:{os.path.getsize(self.path)};".encode()
        return f"{self.index}:{self.label}:".encode() + hashlib.sha256(np.ascontiguousarray(self.pixels)).digest()


@dataclass
class Source:
    """A data set as groups of samples, plus what its manifest needs to say about it."""

    name: str
    split: str
    classes: list[str]
    channels: int
    groups: Callable[[], Iterator[tuple[str, list[Sample]]]]  # (group id, samples), in a fixed order
    fixed_shape: list[int] | None = None  # raw arrays: (C, H, W); files: learned from the stored images
    image_size: int | None = None  # files: resize target when stored sizes vary (None: 224)
    root: str = ""
    describe: dict = field(default_factory=dict)  # identifies the source in the resume plan
    size: int | None = None  # samples in the source, where known without reading it (checks --indices up front)
    task: str = CLASSIFICATION  # "causal-lm": text samples; the manifest then records `tokenizer` and `max_length`
    tokenizer: TokenizerInfo | None = None
    max_length: int | None = None


def folder_source(root: str | Path, split: str = "train", image_size: int | None = None, channels: int = 3,
                  name: str = "") -> Source:
    """An ImageNet-layout folder (``root/<split>/<class>/<image>``), streamed one class at a time."""
    from lab.datasets import image_folder_classes, iter_image_folder

    base, classes = image_folder_classes(root, split)

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        index = 0
        for group in iter_image_folder(root, split):
            samples = [Sample(index + k, group.label, path=str(f)) for k, f in enumerate(group.files)]
            index += len(samples)
            yield group.name, samples

    return Source(name or f"{Path(root).name}", split, classes, channels, groups, image_size=image_size,
                  root=str(base.resolve()), describe={"kind": "image-folder", "root": str(base.resolve())})


def cifar10_source(root: str | Path, split: str = "train") -> Source:
    """The ``cifar-10-batches-py`` folder, one 10,000-image batch file at a time."""
    from lab.datasets import CIFAR10_CLASSES, DatasetError, _load_cifar_batch

    root = Path(root)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise DatasetError(f"no {names[0]} under {root}: expected the cifar-10-batches-py layout")

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        index = 0
        for f in files:
            batch = _load_cifar_batch(f)
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DatasetError(f"{f}: 'data' should be (N, 3072) uint8, got {data.shape}")
            pixels = data.reshape(-1, 3, 32, 32)
            labels = np.asarray(batch["labels"], dtype=np.int64)
            yield f.name, [Sample(index + k, int(labels[k]), pixels=pixels[k]) for k in range(len(labels))]
            index += len(labels)

    return Source("cifar10", split, list(CIFAR10_CLASSES), 3, groups, fixed_shape=[3, 32, 32],
                  describe={"kind": "cifar10", "root": str(root.resolve()), "split": split})


def imageset_source(data: ImageSet, indices: Iterable[int] | None = None, name: str = "", split: str = "") -> Source:
    """An in-memory lab set (one group); `indices` are the samples' indices in their source split."""
    idx = np.arange(len(data)) if indices is None else np.asarray(list(indices) if not isinstance(indices, np.ndarray)
                                                                      else indices)
    x, y = data.x.numpy(), data.y.numpy()

    def groups() -> Iterator[tuple[str, list[Sample]]]:
        yield "all", [Sample(int(idx[r]), int(y[r]), pixels=x[r]) for r in range(len(y))]

    digest = hashlib.sha256(np.ascontiguousarray(x)).hexdigest()[:16]
    return Source(name or data.name, split, list(data.classes), int(data.shape[0]), groups,
                  fixed_shape=list(data.shape), describe={"kind": "arrays", "name": name or data.name,
                                                          "pixels_sha256_16": digest},
                  size=len(data) if indices is None else None)


def dataset_source(name: str, split: str = "train", root: str | Path | None = None,
                   image_size: int | None = None) -> Source:
    """The streaming source for a ``fip shard`` data set name: image folders and CIFAR-10 stream;
    the lab's small sets are read into memory first."""
    from lab.datasets import dataset_info, load_dataset

    dataset_info(name)  # an unknown name fails here, naming the known ones
    if name == "imagenet-folder":
        if root is None:
            raise ValueError("imagenet-folder needs --root (the folder holding train/ and val/)")
        return folder_source(root, split, image_size, 3)
    if name == "cifar10" and root is not None:
        folder = Path(root)
        if any((folder / n).is_file() for n in ("data_batch_1", "test_batch")):
            return cifar10_source(folder, split)
        return folder_source(folder, split, image_size, 3, name="cifar10")  # CIFAR-10 as PNG files per class
    data = load_dataset(name, split, root)
    return imageset_source(data, None, name, split)


# ---------------------------------------------------------------- D_val while streaming
@dataclass(frozen=True)
class DvalSplit:
    """The defender's clean set: `fraction` of each class within each source group (at least one),
    chosen with a generator seeded by (seed, group, class), so it does not depend on the workers.
    Text records all have label 0: a seeded share of each group's records."""

    fraction: float
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"D_val fraction must be in (0, 1), got {self.fraction}")

    def choose(self, group: str, samples: list[Sample]) -> set[int]:
        """Positions in `samples` that go to D_val."""
        from fip.training import derive_seed

        labels = np.array([s.label for s in samples], dtype=np.int64)
        chosen: set[int] = set()
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            k = min(len(members), max(1, int(round(self.fraction * len(members)))))
            rng = np.random.default_rng(derive_seed(self.seed, "dval", group, int(c)))
            chosen.update(int(i) for i in rng.choice(members, k, replace=False))
        return chosen
