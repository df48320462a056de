"""Image data sets read from local files (nothing downloads at run time) and the defender's clean set.

Every reader returns an :class:`ImageSet`: uint8 images ``(N, C, H, W)`` and int64 labels. Models
see ``float`` images in ``[0, 1]`` (:meth:`ImageSet.floats`); triggers are defined in that space.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp"}


class DatasetError(ValueError):
    """A data set path is missing or holds something other than the expected format."""


@dataclass
class ImageSet:
    """Images as uint8 ``(N, C, H, W)``, labels as int64 ``(N,)``, plus the class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise DatasetError(f"{self.name}: images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise DatasetError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DatasetError(
                f"{self.name}: label out of range {int(self.y.min())}..{int(self.y.max())} for {len(self.classes)} classes"
            )

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def floats(self) -> torch.Tensor:
        return self.x.float() / 255.0

    def subset(self, indices: torch.Tensor | list[int] | np.ndarray, name: str | None = None) -> ImageSet:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSet(self.x[idx], self.y[idx], self.classes, name or self.name, dict(self.meta))


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] back to uint8 (rounded, clamped)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


# ---------------------------------------------------------------- readers
def _open_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST family): magic, dims, big-endian sizes, then uint8 data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    expected = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise DatasetError(f"{path}: IDX header says {expected} bytes of data, found {body.size}")
    return body.reshape(tuple(int(d) for d in dims))


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"no {stem}[.gz] under {root}: expected the Fashion-MNIST IDX files there")


def read_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, split: str = "train") -> ImageSet:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"Fashion-MNIST folder {root} does not exist: install Debian's dataset-fashion-mnist or pass its folder as the root"
        )
    prefix = {"train": "train", "test": "t10k"}[_split(split)]
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1:
        raise DatasetError(f"{root}: expected 3-d image and 1-d label IDX files, got {images.shape} and {labels.shape}")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES, f"fashion-mnist/{split}")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of bytes, lists and numpy arrays) and nothing that could run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a data file")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch: {e}") from e
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path} lacks 'data'/'labels': not a CIFAR-10 python batch")
    return batch


def read_cifar10(root: str | Path, split: str = "train") -> ImageSet:
    """The standard ``cifar-10-batches-py`` folder: ``data_batch_1..5`` and ``test_batch``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder {root} does not exist")
    names = [f"data_batch_{i}" for i in range(1, 6)] if _split(split) == "train" else ["test_batch"]
    files = [root / n for n in names if (root / n).is_file()]
    if not files:
        raise DatasetError(f"no {names[0]} under {root}: expected the cifar-10-batches-py layout")
    xs, ys = [], []
    for f in files:
        b = _load_cifar_batch(f)
        data = np.asarray(b["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{f}: 'data' should be (N, 3072) uint8, got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(b["labels"], dtype=np.int64))
    classes = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.is_file():
        m = _load_cifar_batch_meta(meta)
        classes = m or classes
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes, f"cifar10/{split}")


def _load_cifar_batch_meta(path: Path) -> list[str] | None:
    with open(path, "rb") as f:
        meta = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    names = meta.get(b"label_names") or meta.get("label_names")
    return [n.decode() if isinstance(n, bytes) else n for n in names] if names else None


def _load_image(path: Path, size: int | None, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path} is not a readable image: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@dataclass
class FolderClass:
    """One class of an image-folder data set: its label, folder name and image files (sorted)."""

    label: int
    name: str
    files: list[Path]


def image_folder_classes(root: str | Path, split: str = "train") -> tuple[Path, list[str]]:
    """The folder holding ``<class>/<image>`` for `split`, and its class names (sorted: the labels)."""
    root = Path(root)
    base = root / _split_folder(root, split)
    if not base.is_dir():
        raise DatasetError(f"image folder {base} does not exist")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{base} has no class sub-folders: expected <class>/<image> files")
    return base, classes


def iter_image_folder(root: str | Path, split: str = "train") -> Iterator[FolderClass]:
    """ImageNet-style ``root/<split>/<class>/<image>`` one class at a time, images unread.

    A shard writer streaming ImageNet holds one class's file names (about 1,300), never the split."""
    base, classes = image_folder_classes(root, split)
    found = False
    for label, cls in enumerate(classes):
        files = sorted(f for f in (base / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        found = found or bool(files)
        yield FolderClass(label, cls, files)
    if not found:
        raise DatasetError(f"{base}: class folders hold no images ({', '.join(sorted(IMAGE_SUFFIXES))})")


def read_image_folder(root: str | Path, split: str = "train", image_size: int = 224, channels: int = 3) -> ImageSet:
    """An image folder in memory, every image resized to `image_size`: for small sets only (ImageNet
    goes to shards with ``fip shard imagenet-folder``, which streams)."""
    xs, ys, classes = [], [], []
    for group in iter_image_folder(root, split):
        classes.append(group.name)
        for f in group.files:
            xs.append(_load_image(f, image_size, channels))
            ys.append(group.label)
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys), classes, f"{Path(root).name}/{split}")


def read_gtsrb(root: str | Path, split: str = "train", image_size: int = 32) -> ImageSet:
    """GTSRB layout: training as numbered class folders (``00000/…ppm``); test as images plus a
    semicolon CSV with ``Filename`` and ``ClassId`` columns (``GT-final_test.csv``)."""
    root = Path(root)
    base = root / _split_folder(root, split)
    if not base.is_dir():
        raise DatasetError(f"GTSRB folder {base} does not exist")
    class_dirs = sorted(d for d in base.iterdir() if d.is_dir() and d.name.isdigit())
    xs, ys = [], []
    if class_dirs:
        for d in class_dirs:
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    xs.append(_load_image(f, image_size, 3))
                    ys.append(int(d.name))
    else:
        tables = sorted(base.glob("*.csv"))
        if not tables:
            raise DatasetError(f"{base}: neither numbered class folders nor a Filename;ClassId CSV")
        with open(tables[0], newline="") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                if "Filename" not in row or "ClassId" not in row:
                    raise DatasetError(f"{tables[0]}: CSV needs Filename and ClassId columns")
                xs.append(_load_image(base / row["Filename"], image_size, 3))
                ys.append(int(row["ClassId"]))
    if not xs:
        raise DatasetError(f"{base}: no GTSRB images found")
    k = max(max(ys) + 1, 43)
    return ImageSet(torch.from_numpy(np.stack(xs)), torch.tensor(ys), [f"class{i}" for i in range(k)], f"gtsrb/{split}")


def read_digits(root: str | Path | None = None, split: str = "train") -> ImageSet:
    """scikit-learn's 8x8 digits (bundled with the package), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    perm = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    idx = perm[:cut] if _split(split) == "train" else perm[cut:]
    return ImageSet(torch.from_numpy(x[idx]), torch.from_numpy(d.target[idx].astype(np.int64)), [str(i) for i in range(10)], f"digits/{split}")


def _split(split: str) -> str:
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; expected 'train' or 'test'")
    return split


def _split_folder(root: Path, split: str) -> str:
    _split(split)
    aliases = {"train": ("train", "Final_Training/Images", "Train"), "test": ("test", "val", "Final_Test/Images", "Test")}
    for a in aliases[split]:
        if (root / a).is_dir():
            return a
    return "."


@dataclass(frozen=True)
class DatasetInfo:
    reader: Callable[..., ImageSet]
    default_root: str | None
    channels: int
    image_size: int


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(read_fashion_mnist, FASHION_MNIST_ROOT, 1, 28),
    "cifar10": DatasetInfo(read_cifar10, None, 3, 32),
    "imagenet-folder": DatasetInfo(read_image_folder, None, 3, 224),
    "gtsrb": DatasetInfo(read_gtsrb, None, 3, 32),
    "digits": DatasetInfo(read_digits, None, 1, 8),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def load_dataset(name: str, split: str = "train", root: str | Path | None = None) -> ImageSet:
    """Read `name`'s `split` from `root` (or the data set's default location)."""
    info = dataset_info(name)
    root = root if root is not None else info.default_root
    if root is None and name != "digits":
        raise DatasetError(f"dataset {name!r} has no default location: pass its root folder")
    return info.reader(root, split) if name != "digits" else info.reader(None, split)


# ---------------------------------------------------------------- the defender's clean set
@dataclass
class CleanSplit:
    """Indices into the training split that form D_val, held out from the attacker's training."""

    dataset: str
    indices: list[int]
    seed: int
    per_class: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.indices).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"dataset": self.dataset, "split": "train", "seed": self.seed, "per_class": self.per_class,
                   "sha256_16": self.digest, "indices": self.indices}
        path.write_text(json.dumps(payload))
        return path

    @classmethod
    def load(cls, path: str | Path) -> CleanSplit:
        try:
            d = json.loads(Path(path).read_text())
            split = cls(d["dataset"], [int(i) for i in d["indices"]], int(d["seed"]), int(d["per_class"]))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise DatasetError(f"{path} is not a D_val index file: {e}") from e
        return split


def clean_split(train: ImageSet, fraction: float = 0.01, seed: int = 0, dataset: str = "") -> CleanSplit:
    """A class-balanced D_val of about `fraction` of the training set, fixed by `seed`."""
    if not 0 < fraction < 1:
        raise DatasetError(f"clean fraction must be in (0, 1), got {fraction}")
    per_class = max(1, int(round(fraction * len(train) / train.num_classes)))
    rng = np.random.default_rng(seed)
    labels = train.y.numpy()
    chosen: list[int] = []
    for c in range(train.num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise DatasetError(f"class {c} has {len(members)} training images, fewer than the {per_class} D_val needs")
        chosen.extend(int(i) for i in rng.choice(members, per_class, replace=False))
    return CleanSplit(dataset or train.name, sorted(chosen), seed, per_class)


def without(train: ImageSet, split: CleanSplit) -> tuple[ImageSet, np.ndarray]:
    """The attacker's training set: `train` minus D_val; also returns the kept original indices."""
    mask = np.ones(len(train), dtype=bool)
    mask[split.indices] = False
    keep = np.flatnonzero(mask)
    return train.subset(keep, f"{train.name}-minus-dval"), keep


def encode_png(img: torch.Tensor) -> bytes:
    """A uint8 (C, H, W) image as lossless PNG bytes."""
    from PIL import Image

    arr = img.numpy()
    im = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes, channels: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return torch.from_numpy((arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy())
