"""What a sample, its loss and its prediction are: the one place the method's maths meets the task.

FIP's terms are all built from one quantity, a sample's negative log-likelihood ``-log p(y | x; theta)``:
the cross-entropy is its mean, the diagonal Fisher and ``Tr(F)`` square its gradient, the true Fisher
differentiates it at labels drawn from the model. Two tasks define it (docs/language-models.md):

- :data:`CLASSIFICATION` (images): ``x`` is a batch of inputs, ``y`` one class index per sample, the
  model's output ``(B, classes)`` logits.
- :data:`CAUSAL_LM` (language models): ``x`` is ``(B, T)`` token ids, right-padded; ``y`` is ``(B, T)``
  aligned with ``x``, the token id where the prediction counts (the response) and ``IGNORE = -100``
  elsewhere (the prompt, the padding); the model's output ``(B, T, vocab)`` logits, position ``t``
  predicting token ``t + 1`` (the Hugging Face convention). One *sample* is one sequence: its
  negative log-likelihood is the mean over its response tokens, so a sequence's score gradient has the
  scale of one token's whatever its length, and the training loss is the mean over sequences.

Every function of ``fip/`` that differentiates a loss takes a ``task`` (default: classification), so the
Fisher, the ``Tr(F)`` penalty, the Fisher-weighted pull and Fast FIP work per sequence unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

IGNORE = -100  # a label that no loss counts (the prompt and the padding of a sequence)
TaskName = Literal["classification", "causal-lm"]


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of ``probs`` (2-D), on the generator's device, landing on the probabilities'."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@dataclass(frozen=True)
class Classification:
    """One label per input; the output is ``(B, classes)`` logits."""

    name: TaskName = "classification"

    def per_sample_nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``-log p(y_i | x_i)`` per sample, shape ``(B,)``."""
        return F.cross_entropy(logits, y, reduction="none")

    def mean_nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's cross-entropy: the mean of :meth:`per_sample_nll`."""
        return F.cross_entropy(logits, y)

    def sample_labels(self, logits: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """Labels drawn from the model's own predictive distribution (the true Fisher's)."""
        return _draw(torch.softmax(logits.detach().float(), dim=-1), generator)

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, num_outputs: int | None = None) -> None:
        """A clear error for labels that do not fit the inputs or the model."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"batch has {x.shape[0]} inputs but {y.shape[0]} labels")
        if y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"labels must be one class index per input, got shape {tuple(y.shape)}")
        if num_outputs is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_outputs):
            raise ValueError(f"label out of range: saw {int(y.min())}..{int(y.max())}, model has {num_outputs} classes")

    def sample_hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, (correct predictions, predictions made): here 0 or 1 of 1."""
        return (logits.argmax(-1) == y).long(), torch.ones_like(y)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """(correct predictions, predictions made): accuracy's numerator and denominator."""
        right, made = self.sample_hits(logits, y)
        return int(right.sum()), int(made.sum())

    def scored(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of every prediction scored, one row each: here one per input."""
        return logits, y

    def owners(self, y: torch.Tensor) -> torch.Tensor:
        """The sample each row of :meth:`scored` belongs to: here its own."""
        return torch.arange(len(y))

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over samples of ``KL(p_teacher || p_student)``."""
        return F.kl_div(F.log_softmax(student_logits, -1), F.log_softmax(teacher_logits, -1), log_target=True,
                        reduction="batchmean")


@dataclass(frozen=True)
class CausalLM:
    """Next-token prediction, scored on the positions whose label is not :data:`IGNORE`."""

    name: TaskName = "causal-lm"

    @staticmethod
    def _shifted(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Position t's logits against token t + 1's label: (logits, targets, mask), targets clamped to valid ids."""
        lg, tgt = logits[:, :-1], y[:, 1:]
        mask = tgt != IGNORE
        return lg, tgt.clamp(min=0), mask

    def per_sample_nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per sequence, the mean over its response tokens of ``-log p(token | prefix)``; shape ``(B,)``.
        A sequence with no response token contributes 0."""
        lg, tgt, mask = self._shifted(logits, y)
        nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view_as(tgt)
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)

    def mean_nll(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's loss: the mean over sequences of :meth:`per_sample_nll`."""
        return self.per_sample_nll(logits, y).mean()

    def sample_labels(self, logits: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None):
        """At every scored position, a token drawn from the model's next-token distribution (the true
        Fisher's); the other positions stay :data:`IGNORE`."""
        lg, _, mask = self._shifted(logits, y)
        drawn = _draw(torch.softmax(lg.detach().float().reshape(-1, lg.shape[-1]), dim=-1), generator)
        out = torch.full_like(y, IGNORE)
        out[:, 1:] = torch.where(mask, drawn.view(mask.shape), torch.full_like(mask, IGNORE, dtype=y.dtype))
        return out

    def check_batch(self, x: torch.Tensor, y: torch.Tensor, num_outputs: int | None = None) -> None:
        """A clear error for token ids and labels that do not line up or do not fit the vocabulary."""
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"a causal LM takes (batch, tokens) integer token ids, got {x.dtype} {tuple(x.shape)}")
        if y.shape != x.shape:
            raise ValueError(f"labels must align with the token ids: got {tuple(y.shape)} for {tuple(x.shape)}")
        scored = y[y != IGNORE]
        if num_outputs is not None and len(scored) and (int(scored.min()) < 0 or int(scored.max()) >= num_outputs):
            raise ValueError(f"label out of range: saw token ids {int(scored.min())}..{int(scored.max())}, the "
                             f"vocabulary has {num_outputs}")
        if num_outputs is not None and len(x) and (int(x.min()) < 0 or int(x.max()) >= num_outputs):
            raise ValueError(f"token id out of range: saw {int(x.min())}..{int(x.max())}, the vocabulary has "
                             f"{num_outputs}")

    def sample_hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence, (correctly predicted next tokens, scored positions)."""
        lg, tgt, mask = self._shifted(logits, y)
        return ((lg.argmax(-1) == tgt) & mask).sum(1), mask.sum(1)

    def hits(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
        """(correctly predicted next tokens, scored positions): next-token accuracy's parts."""
        right, made = self.sample_hits(logits, y)
        return int(right.sum()), int(made.sum())

    def scored(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, targets) of every scored position, one row each: position t's logits against token t + 1."""
        lg, tgt, mask = self._shifted(logits, y)
        return lg[mask], tgt[mask]

    def owners(self, y: torch.Tensor) -> torch.Tensor:
        """The sequence each row of :meth:`scored` belongs to (its rows come sequence by sequence)."""
        return torch.nonzero(y[:, 1:] != IGNORE)[:, 0]

    def kl(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean over sequences of the mean over scored positions of ``KL(p_teacher || p_student)``."""
        s, _, mask = self._shifted(student_logits, y)
        t = teacher_logits[:, :-1]
        per_pos = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
        return ((per_pos * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


Task = Classification | CausalLM
CLASSIFICATION = Classification()
CAUSAL_LM = CausalLM()
TASKS: dict[str, Task] = {t.name: t for t in (CLASSIFICATION, CAUSAL_LM)}


def task_named(name: str) -> Task:
    """The task called `name`, or a one-line error listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of: {', '.join(TASKS)}")
    return TASKS[name]
