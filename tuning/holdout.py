"""Split D_val once per sweep into the share trials train on and the share only the objective reads.

A sweep that scored trials on the samples they were fine-tuned on would reward over-fitting D_val.
:func:`split_dval` draws a seeded, class-balanced held-out share of images (:func:`split_sequences`, a
seeded share of text sequences, which have no classes); :func:`write_split` writes both parts as shards
(``dval-train`` is every trial's ``inputs.clean``, ``dval-holdout`` is read only by :mod:`tuning.objective`)
and reuses them when a sweep resumes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import torch

from fip.training import generator
from lab.datasets import ImageSet
from pipeline.shard_sources import Sample, Source
from pipeline.shard_writer import write_shards, write_source
from pipeline.shardfmt import ShardError
from pipeline.shards import ShardSource, iter_raw_shard, open_shards, read_all
from pipeline.storage import Storage, join
from pipeline.text_source import copy_tokenizer
from pipeline.transforms import model_input

TRAIN_NAME, HOLDOUT_NAME = "dval-train", "dval-holdout"


def split_dval(y: torch.Tensor, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows): about `fraction` of each class held out (at least one), seeded."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    train, held = [], []
    for c in torch.unique(y).tolist():
        rows = torch.nonzero(y == c).flatten()
        if len(rows) < 2:
            raise ValueError(f"class {c} has {len(rows)} clean sample(s) in D_val: too few to hold any out")
        rows = rows[torch.randperm(len(rows), generator=generator(seed, "holdout", c))]
        k = min(len(rows) - 1, max(1, int(round(fraction * len(rows)))))
        held += rows[:k].tolist()
        train += rows[k:].tolist()
    return np.array(sorted(train)), np.array(sorted(held))


def split_sequences(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, held-out rows) of `n` text sequences: about `fraction` held out (at least one each), seeded."""
    if not 0 < fraction < 1:
        raise ValueError(f"holdout fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"D_val has {n} sequence(s): too few to hold any out")
    rows = torch.randperm(n, generator=generator(seed, "holdout", "text"))
    k = min(n - 1, max(1, int(round(fraction * n))))
    return np.sort(rows[k:].numpy()), np.sort(rows[:k].numpy())


def stored_text_source(source: ShardSource) -> Source:
    """Text shards as a :class:`Source` of their samples as stored: written again with
    ``write_source(indices=...)`` they make a subset with the same tokenizer and length. Malformed samples fail
    the write, naming the shard."""
    def groups() -> Iterator[tuple[str, list[Sample]]]:
        position = 0
        for url, info in zip(source.urls, source.infos, strict=True):
            samples = []
            for raw in iter_raw_shard(url, source.store, info, text=True):
                if raw.problem is not None:
                    raise raw.problem
                prompt, response = raw.data
                index = raw.index if raw.index is not None else position
                samples.append(Sample(index, 0, text=(list(prompt), list(response), f"{url}#{raw.key}")))
                position += 1
            yield url, samples

    m = source.manifest
    # no `size`: the samples keep their stored indices, which run past the count where D_val was kept as a subset
    # of a larger set (`fip shard text --dval-fraction`); write_source still refuses an index it does not meet
    return Source(m.dataset, m.split, [], 0, groups, root="", describe={"kind": "text-shards", "urls": list(source.urls)},
                  task=m.task, tokenizer=m.tokenizer, max_length=m.max_length)


def write_split(clean: str, dest: str, fraction: float, seed: int, store: Storage | None = None) -> tuple[str, str]:
    """Write ``<dest>/dval-train`` and ``<dest>/dval-holdout`` from the clean shards (once: an existing split
    made from the same source with the same fraction and seed is reused, a different one is refused)."""
    store = store or Storage()
    source = open_shards(clean, store)
    key = {"source_indices": source.manifest.meta.get("indices_sha256_16"), "source_count": source.total,
           "holdout_fraction": fraction, "holdout_seed": seed}
    train_url, held_url = join(dest, TRAIN_NAME), join(dest, HOLDOUT_NAME)
    marker = join(dest, "dval-split.json")
    if store.exists(marker):
        found = json.loads(store.read_bytes(marker))
        if found != key:
            raise ShardError(f"{dest} already holds a D_val split made differently ({found}); use another sweep folder")
        return train_url, held_url
    x, y, idx = read_all(source)
    if source.manifest.is_text:
        train_rows, held_rows = split_sequences(len(idx), fraction, seed)
        stored = stored_text_source(source)
        for url, rows, part in ((train_url, train_rows, TRAIN_NAME), (held_url, held_rows, HOLDOUT_NAME)):
            write_source(stored, url, maxcount=1000, indices=idx.numpy()[rows].tolist(), meta={"part": part, **key},
                         store=store, overwrite=True)
            copy_tokenizer(source.urls, url, store)
    else:
        data = ImageSet(x, y, list(source.manifest.classes), source.manifest.dataset)
        train_rows, held_rows = split_dval(y, fraction, seed)
        for url, rows, part in ((train_url, train_rows, TRAIN_NAME), (held_url, held_rows, HOLDOUT_NAME)):
            write_shards(data.subset(rows), url, maxcount=1000, indices=idx.numpy()[rows],
                         dataset=source.manifest.dataset, split=source.manifest.split, meta={"part": part, **key},
                         store=store)
    store.write_bytes(marker, json.dumps(key).encode())
    return train_url, held_url


def read_holdout(url: str, store: Storage | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images as floats in [0, 1] and their labels (text: token ids and their aligned labels)."""
    x, y, _ = read_all(open_shards(url, store))
    return model_input(x), y
