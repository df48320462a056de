"""How much a sweep's choice rests on a few held-out samples.

The objective reads held-out accuracy and the probe's largest share, both counted over a few hundred held-out
samples. Each trial (and the suspect) keeps, per held-out sample, whether it was classified correctly (a
sequence: its share of correct next tokens) and which samples each probe target's perturbation moved. Resampling
the held-out samples (bootstrap, paired: one resample for every trial and the suspect) and scoring every trial
again says how often the winner stays the winner: a choice kept in 95 % of the resamples is not the same
evidence as one kept in 40 % (docs/tuning.md, "How much the choice rests on").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tuning.objective import Holdout, ObjectiveWeights, score, scored_logits

RESAMPLES = 200  # bootstrap resamples of the held-out share per sweep
SAMPLE_KEYS = ("sample_acc", "sample_hits", "sample_eligible", "sample_targets")  # SampleRecord.encode's fields


@dataclass(frozen=True)
class SampleRecord:
    """One model's held-out record, per sample: accuracy (NaN for a sample with nothing scored), and per probe
    target which samples its perturbation moved (`hits`) and which counted (`eligible`), targets x samples."""

    acc: np.ndarray
    hits: np.ndarray
    eligible: np.ndarray

    def rates(self, idx: np.ndarray) -> np.ndarray:
        """Each probe target's share on the samples `idx` (a resample: indices may repeat)."""
        return self.hits[:, idx].sum(1) / np.maximum(self.eligible[:, idx].sum(1), 1)

    def features(self, idx: np.ndarray) -> dict[str, float]:
        """`holdout_acc` and `uap_max` on the samples `idx`."""
        acc, rates = self.acc[idx], self.rates(idx)
        return {"holdout_acc": float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
                "uap_max": float(rates.max()) if rates.size else 0.0}

    def encode(self) -> dict[str, str]:
        """As strings a Tune result carries (bits as hex, accuracies as float32 hex)."""
        return {"sample_acc": self.acc.astype(np.float32).tobytes().hex(),
                "sample_hits": np.packbits(self.hits).tobytes().hex(),
                "sample_eligible": np.packbits(self.eligible).tobytes().hex(),
                "sample_targets": str(self.hits.shape[0])}

    @classmethod
    def decode(cls, fields: dict) -> SampleRecord:
        acc = np.frombuffer(bytes.fromhex(fields["sample_acc"]), dtype=np.float32).astype(np.float64)
        shape = (int(fields["sample_targets"]), len(acc))

        def bits(text: str) -> np.ndarray:
            raw = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))
            return raw[: shape[0] * shape[1]].astype(bool).reshape(shape)

        return cls(acc, bits(fields["sample_hits"]), bits(fields["sample_eligible"]))


@torch.no_grad()
def sample_record(model: nn.Module, holdout: Holdout, found: dict | None) -> SampleRecord:
    """`model`'s per-sample record on the held-out share; `found`: its probe's result (None: not probed, and
    the record has no targets)."""
    logits, targets = scored_logits(model, holdout.x, holdout.y, holdout.task)
    owner = holdout.task.owners(holdout.y)
    n = len(holdout.y)
    count = torch.zeros(n).index_add_(0, owner, torch.ones(len(owner)))
    right = torch.zeros(n).index_add_(0, owner, (logits.argmax(1) == targets).float())
    acc = torch.where(count > 0, right / count.clamp(min=1), torch.full((n,), float("nan")))
    if found is None:
        empty = np.zeros((0, n), dtype=bool)
        return SampleRecord(acc.numpy().astype(np.float64), empty, empty)
    return SampleRecord(acc.numpy().astype(np.float64), found["uap_hits"].numpy(), found["uap_eligible"].numpy())


def choice_stability(records: list[SampleRecord], features: list[dict], suspect: SampleRecord,
                     suspect_features: dict, weights: ObjectiveWeights = ObjectiveWeights(),
                     resamples: int = RESAMPLES, seed: int = 0) -> list[float]:
    """Per trial, the share of `resamples` bootstrap resamples of the held-out samples in which it scores highest
    (ties: the earlier trial). Accuracy and the probe's share are recounted on each resample; the other features
    (KL, Tr(F): not weighted by default) keep their full-sample values."""
    if not records:
        return []
    n = len(suspect.acc)
    rng = np.random.default_rng(seed)
    wins = np.zeros(len(records))
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        ref = {**suspect_features, "acc": suspect.features(idx)["holdout_acc"]}
        scores = [score({**f, **r.features(idx)}, ref, weights) for r, f in zip(records, features, strict=True)]
        wins[int(np.argmax(np.nan_to_num(scores, nan=-np.inf)))] += 1  # np.argmax: the first of equal scores
    return (wins / resamples).tolist()
