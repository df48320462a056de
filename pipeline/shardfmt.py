"""The shard format, which the reader (:mod:`pipeline.shards`) and the writers
(:mod:`pipeline.shard_writer`) share and neither owns: the manifest and its names, shard URLs, the
tar layout of a sample, and the SHA-256 taken while a shard streams through.

A shard set is ``000000.tar, 000001.tar, ...`` plus ``manifest.json`` (sample counts, classes, image
shape, per-shard SHA-256), or shards made by other tools plus an index ``<stem>.manifest.json``. A
sample is the tar members sharing a key, as WebDataset groups them: an image under ``jpg``, ``jpeg``,
``png`` or ``webp``, its label under ``cls`` and, optionally, its index in the source split under
``idx``. A text sample (``task: causal-lm``, ``fip shard text``) carries its token ids under ``json``
(``{"prompt": [ids], "response": [ids]}``) and its index under ``idx``; the manifest records the
tokenizer and the sequence length readers pad to. Plain ``tarfile`` throughout: webdataset's own reader and writer import torch, a second of
start-up in every writing process.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

MANIFEST = "manifest.json"
PARTIAL_MANIFEST = "manifest.partial.json"  # an unfinished write's progress (pipeline.shard_writer)
INDEX_SUFFIX = ".manifest.json"
SHARD_NAME = "{:06d}.tar"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image members a sample may carry, in preference order
MAX_SIZES = 4  # distinct image sizes remembered per shard (more: the shard is "varied")
DEFAULT_IMAGE_SIZE = 224


class ShardError(ValueError):
    """A shard is missing, empty, corrupt or truncated; the message names it."""


class ShardHashError(ShardError):
    """A shard's bytes differ from the SHA-256 its manifest records."""


class MalformedSample(ValueError):
    """A shard's sample lacks an image or a label (text: token ids); names the shard and the key."""


CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"  # the tasks a shard set may hold (fip.tasks' names)


# ---------------------------------------------------------------- the manifest
@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    source_digest: str = ""  # what went in (our writer): a resumed write keeps a shard whose digest matches
    meta: dict = field(default_factory=dict)  # stored formats and image sizes


@dataclass
class TokenizerInfo:
    """The tokenizer a text shard set was written with: what a reader needs (pad and eos ids, the vocabulary's
    size, to check ids) and what identifies it (the SHA-256 of its ``tokenizer.json``)."""

    name: str  # its folder's name, for people
    sha256: str  # of tokenizer.json: a reader given a tokenizer refuses another one
    vocab_size: int
    pad_id: int
    eos_id: int
    bos_id: int | None = None  # the token the tokenizer starts a prompt with (Llama's <s>), kept when a prompt is cut


@dataclass
class ShardManifest:
    dataset: str
    split: str
    classes: list[str]  # text: empty
    image_shape: list[int]  # what a reader yields: (C, S, S), after the transform when sizes vary; text: empty
    count: int
    shards: list[ShardInfo]
    meta: dict = field(default_factory=dict)
    base: str | None = None  # where the shards live, when the manifest is kept elsewhere (read-only bucket)
    task: str = CLASSIFICATION  # what a sample is: an image and its class, or a prompt and response (causal-lm)
    tokenizer: TokenizerInfo | None = None  # causal-lm only
    max_length: int | None = None  # causal-lm only: the length every sequence is padded or truncated to

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> ShardManifest:
        try:
            d = json.loads(text)
            d["shards"] = [ShardInfo(**s) for s in d["shards"]]
            if d.get("tokenizer") is not None:
                d["tokenizer"] = TokenizerInfo(**d["tokenizer"])
            manifest = cls(**d)
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as e:
            raise ShardError(f"{where} is not a shard manifest: {e}") from e
        manifest.check(where)
        return manifest

    def check(self, where: str) -> None:
        """Refuse a manifest that contradicts itself (types, shape, its total against its shards' counts)."""

        def count_ok(n) -> bool:
            return isinstance(n, int) and not isinstance(n, bool) and n >= 0

        if self.task == CAUSAL_LM:
            self._check_text(where, count_ok)
        elif self.task != CLASSIFICATION:
            raise ShardError(f"{where}: unknown task {self.task!r}; expected {CLASSIFICATION} or {CAUSAL_LM}")
        else:
            shape = self.image_shape
            if not (isinstance(shape, list) and len(shape) == 3 and all(count_ok(v) and v > 0 for v in shape)):
                raise ShardError(f"{where}: image_shape must be three positive integers (C, H, W), got {shape!r}")
            if not isinstance(self.classes, list) or not self.classes:
                raise ShardError(f"{where}: classes must be a non-empty list")
        for s in self.shards:
            if not count_ok(s.count) or not isinstance(s.sha256, str):
                raise ShardError(f"{where}: shard {s.name!r} has count {s.count!r} and sha256 {s.sha256!r}")
        listed = sum(s.count for s in self.shards)
        if self.count != listed:
            raise ShardError(f"{where}: count {self.count} but its shards' counts add up to {listed}")

    def _check_text(self, where: str, count_ok) -> None:
        tok = self.tokenizer
        if not isinstance(tok, TokenizerInfo):
            raise ShardError(f"{where}: a {CAUSAL_LM} manifest must name its tokenizer")
        if not (count_ok(tok.vocab_size) and tok.vocab_size > 0):
            raise ShardError(f"{where}: tokenizer vocab_size must be a positive integer, got {tok.vocab_size!r}")
        for name in ("pad_id", "eos_id", "bos_id"):
            v = getattr(tok, name)
            if not (count_ok(v) and v < tok.vocab_size) and not (name == "bos_id" and v is None):
                raise ShardError(f"{where}: tokenizer {name} {v!r} is not in its vocabulary of {tok.vocab_size}")
        if not (count_ok(self.max_length) and self.max_length >= 2):
            raise ShardError(f"{where}: max_length must be an integer >= 2, got {self.max_length!r}")

    @property
    def is_text(self) -> bool:
        return self.task == CAUSAL_LM

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def variable_size(self) -> bool:
        """Stored images differ in size (source JPEGs): readers resize them to ``image_shape``."""
        return bool(self.meta.get("variable_size"))


def manifest_shape(infos: Iterable[ShardInfo], channels: int, image_size: int | None = None,
                   fixed_shape: list[int] | None = None) -> tuple[list[int], dict]:
    """(image_shape, meta) of a set from its shards' stored formats and sizes: one stored size, and no
    `image_size` asked for, is the shape; otherwise readers resize to `image_size` (default 224)
    squares. `fixed_shape` (raw arrays) is the shape whatever was stored. The one place a writer or
    an index decides what a reader yields."""
    formats: dict[str, int] = {}
    sizes: list[list[int]] = []
    varied = False
    for info in infos:
        for k, v in info.meta.get("formats", {}).items():
            formats[k] = formats.get(k, 0) + v
        varied = varied or info.meta.get("varied", False)
        sizes += [s for s in info.meta.get("sizes", []) if s not in sizes]
    if fixed_shape is not None:
        shape, variable = list(fixed_shape), False
    elif len(sizes) == 1 and not varied and image_size is None:
        shape, variable = [channels, sizes[0][1], sizes[0][0]], False
    else:
        size = image_size or DEFAULT_IMAGE_SIZE
        shape, variable = [channels, size, size], True
    return shape, {"variable_size": variable, "formats": formats, "stored_sizes": sizes[:MAX_SIZES]}


class SizeTally:
    """A shard's stored formats and image sizes, as its manifest entry keeps them (``meta``)."""

    def __init__(self) -> None:
        self.formats: dict[str, int] = {}
        self.sizes: list[list[int]] = []
        self.varied = False

    def add(self, kind: str, size: Iterable[int] | None) -> None:
        """One stored sample of format `kind` (its (width, height); None for a sample with no image)."""
        self.formats[kind] = self.formats.get(kind, 0) + 1
        if size is None:
            return
        size = list(size)
        if size not in self.sizes:
            if len(self.sizes) < MAX_SIZES:
                self.sizes.append(size)
            else:
                self.varied = True

    def meta(self) -> dict:
        return {"formats": self.formats, "sizes": self.sizes, "varied": self.varied}


# ---------------------------------------------------------------- names and URLs
def shard_name(number: int) -> str:
    return SHARD_NAME.format(number)


def split_url(url: str) -> tuple[str, str]:
    """(folder, name) of a shard or manifest URL."""
    return (url.rsplit("/", 1)[0], url.rsplit("/", 1)[1]) if "/" in url else (".", url)


def expand_braces(pattern: str) -> list[str]:
    """``a/{000000..000003}.tar`` -> four URLs (zero padding kept), ``{a,b}`` -> two; no braces -> [pattern]."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise ShardError(f"brace range {{{body}}} in {pattern!r} runs backwards")
        choices = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ShardError(f"cannot expand {{{body}}} in {pattern!r}: expected {{000..009}} or {{a,b}}")
    return [url for c in choices for url in expand_braces(pattern[: m.start()] + c + pattern[m.end() :])]


def index_name(pattern: str) -> str:
    """The index file ``fip shard index`` writes for a shard pattern: ``imagenet-train-{000000..001281}.tar``
    -> ``imagenet-train.manifest.json`` (one folder may hold several shard sets)."""
    name = split_url(pattern)[1]
    stem = re.sub(r"\{[^{}]*\}.*$", "", name)
    if stem == name:  # a single shard: its name without .tar
        stem = name.removesuffix(".tar")
    stem = stem.rstrip("-_.")
    return f"{stem}{INDEX_SUFFIX}" if stem else MANIFEST


# ---------------------------------------------------------------- hashing while streaming
class HashingWriter:
    """A write-only file wrapper that hashes what passes through (the shard's SHA-256 without a re-read)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()


class HashedStream(io.RawIOBase):
    """A read stream that hashes the bytes as they are read: a shard's SHA-256 without a second pass.

    `drain_on_close`: hash what the reader left unread (the end-of-archive blocks) when closed; a reader
    that stops mid-shard closes without it and skips the rest."""

    def __init__(self, body, sha, drain_on_close: bool = True) -> None:
        self.body, self.sha, self.drain_on_close = body, sha, drain_on_close

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.body.read() if n is None or n < 0 else self.body.read(n)
        self.sha.update(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def hexdigest_to_end(self) -> str:
        """Read and hash the rest of the stream; the SHA-256 of all of it."""
        while self.read(1 << 20):
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        if not self.closed:
            if self.drain_on_close:
                self.hexdigest_to_end()
            self.body.close()
        super().close()


# ---------------------------------------------------------------- the tar layout of a sample
def sniff(data: bytes) -> str | None:
    """The container of encoded image bytes that shards keep as they are."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def iter_tar_samples(stream) -> Iterator[dict]:
    """A tar stream's members grouped into samples as WebDataset groups them: the key is a member's
    path up to the first dot of its file name, the extension (lower-cased) names the field, and
    consecutive members sharing a key form one sample. Names starting with ``__`` are metadata."""
    current: dict | None = None
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            folder, _, fname = info.name.rpartition("/")
            stem, dot, ext = fname.partition(".")
            if info.isreg() and dot and stem and not fname.startswith("__"):
                key = f"{folder}/{stem}" if folder else stem
                data = tar.extractfile(info).read()
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                ext = ext.lower()
                if ext in current:
                    raise ValueError(f"{info.name}: a second {ext!r} member for key {key!r}")
                current[ext] = data
            tar.members = []  # a stream of any length: keep no member list
    if current is not None:
        yield current


def parse_sample(sample: dict, url: str) -> tuple[str, bytes, int, int | None]:
    """(key, image bytes, label, source index or None) of one grouped sample."""
    key = sample.get("__key__")
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise MalformedSample(f"shard {url}: sample {key!r} is malformed (no image under {', '.join(IMAGE_KEYS)}; "
                              f"members: {', '.join(k for k in sample if not k.startswith('__'))})")
    try:
        label = int(sample["cls"].strip())
        index = int(sample["idx"]) if "idx" in sample else None
    except (KeyError, ValueError) as e:
        raise MalformedSample(f"shard {url}: sample {key!r} is malformed (label or index: {e!r})") from e
    return key, image, label, index


def _add_members(tar: tarfile.TarFile, key: str, members: Iterable[tuple[str, bytes]]) -> None:
    """Append members ``<key>.<ext>`` with fixed owner, mode and time (the same samples give the same
    bytes): what WebDataset's own writer makes."""
    for ext, payload in members:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mode, info.mtime = len(payload), 0o444, 0
        tar.addfile(info, io.BytesIO(payload))


def add_sample(tar: tarfile.TarFile, key: str, kind: str, image: bytes, label: int, index: int) -> None:
    """Append one image sample as members ``<key>.<kind>``, ``<key>.cls``, ``<key>.idx``."""
    _add_members(tar, key, ((kind, image), ("cls", str(label).encode()), ("idx", str(index).encode())))


# ---------------------------------------------------------------- the tar layout of a text sample
TEXT_KEY = "json"


def add_text_sample(tar: tarfile.TarFile, key: str, prompt: list[int], response: list[int], index: int) -> None:
    """Append one text sample as ``<key>.json`` (``{"prompt": [ids], "response": [ids]}``) and ``<key>.idx``:
    plain JSON, which any tool reads (never pickle)."""
    body = json.dumps({"prompt": prompt, "response": response}, separators=(",", ":")).encode()
    _add_members(tar, key, ((TEXT_KEY, body), ("idx", str(index).encode())))


def parse_text_sample(sample: dict, url: str) -> tuple[str, tuple[list[int], list[int]], int | None]:
    """(key, (prompt ids, response ids), source index or None) of one grouped text sample."""
    key = sample.get("__key__")

    def bad(why: str) -> MalformedSample:
        return MalformedSample(f"shard {url}: sample {key!r} is malformed ({why})")

    if TEXT_KEY not in sample:
        members = ", ".join(k for k in sample if not k.startswith("__"))
        raise bad(f"no token ids under {TEXT_KEY}; members: {members}")
    try:
        body = json.loads(sample[TEXT_KEY])
        index = int(sample["idx"]) if "idx" in sample else None
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"token ids or index: {e}") from e
    if not isinstance(body, dict):
        raise bad(f"{TEXT_KEY} holds {type(body).__name__}, not an object with prompt and response")
    ids = []
    for part in ("prompt", "response"):
        v = body.get(part)
        if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            raise bad(f"{part} must be a list of integer token ids")
        ids.append(v)
    return key, (ids[0], ids[1]), index


def fit_prompt(prompt: list[int], response_len: int, max_length: int, bos_id: int | None = None) -> list[int] | None:
    """The prompt a record keeps within `max_length` tokens with its response and the eos that ends it: cut from
    the left, but for a leading `bos_id`; None where the response, the eos, the BOS and the prompt's last token
    (which predicts the response's first) do not fit. The one rule the writer and the readers share."""
    head = 1 if bos_id is not None and prompt[:1] == [bos_id] else 0
    room = max_length - response_len - 1
    if room < min(len(prompt), head + 1):
        return None
    if len(prompt) <= room:
        return prompt
    return prompt[:head] + prompt[len(prompt) - (room - head):]
