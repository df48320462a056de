"""What the stages hand the driver, the sweep and the tests: the file names of their last Ray Train
checkpoint, defined here once so that a rename cannot part writer from reader, and each stage's output
as a type, so that no reader parses metric names back apart.
(The purifier's own state keeps the model's weights under :data:`fip.purify.MODEL_STATE`: the
method's name, which the method cannot import from here.)

Before/after figures are structure (:class:`Measured`); the names users see in MLflow and in a job's
result (``acc_before``, ``asr_after``, ...) are made from it in one place, :meth:`Measured.flat`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

METRICS = "metrics.json"  # every stage's output (its type below): the driver logs its metrics, and keeps no file
FISHER = "fisher.safetensors"  # the Fisher stage's estimate
PURIFIED = "purified.safetensors"  # the purify stage's model ...
PURIFIED_SIDECAR = PURIFIED.rsplit(".", 1)[0] + ".json"  # ... and its metadata (fip.io.save_model's sidecar)
HISTORY = "history.json"  # the purify stage's step logs and evaluations
STATE = "state.pt"  # a resumable checkpoint's torch state (pipeline.workers.checkpoint) ...
LOGS = "logs.json"  # ... and its JSON logs


@dataclass
class Measured:
    """Test-set figures (acc, and asr/ra in benchmark mode) of the suspect (`before`) and the purified
    model (`after`); empty without test shards."""

    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)

    def flat(self) -> dict[str, float]:
        """The metric names users read (``acc_before``, ``asr_after``, ...): the one place they are spelled."""
        return {**{f"{k}_before": v for k, v in self.before.items()},
                **{f"{k}_after": v for k, v in self.after.items()}}

    def __or__(self, other: Measured) -> Measured:
        return Measured({**self.before, **other.before}, {**self.after, **other.after})


@dataclass
class FisherOutput:
    """The Fisher stage's output; its estimate itself is the file :data:`FISHER`."""

    count: int
    trace: float
    skipped_samples: int
    seconds: float
    measured: Measured = field(default_factory=Measured)  # the suspect's test figures (before only)

    def metrics(self) -> dict[str, float]:
        return {"fisher_count": self.count, "fisher_trace": self.trace, "skipped_samples": self.skipped_samples,
                "fisher_seconds": self.seconds, **self.measured.flat()}


@dataclass
class PurifyOutput:
    """The purify stage's output; the model, its sidecar and its history are the files :data:`PURIFIED`,
    :data:`PURIFIED_SIDECAR` and :data:`HISTORY`."""

    step: int
    seconds: float
    measured: Measured = field(default_factory=Measured)  # the purified model's test figures (after only)

    def metrics(self) -> dict[str, float]:
        return {"step": self.step, "purify_seconds": self.seconds, **self.measured.flat()}


@dataclass
class StageMetrics:
    """The output of a stage with no type of its own (one a caller adds to the driver's stages): its metrics."""

    values: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return dict(self.values)


StageOutput = FisherOutput | PurifyOutput | StageMetrics
_OUTPUTS: dict[str, type] = {"fisher": FisherOutput, "purify": PurifyOutput, "metrics": StageMetrics}


def encode_output(output: StageOutput) -> bytes:
    """The :data:`METRICS` file of a stage's last checkpoint."""
    kind = next(k for k, t in _OUTPUTS.items() if isinstance(output, t))
    return json.dumps({"kind": kind, **asdict(output)}).encode()


def decode_output(data: bytes) -> StageOutput:
    """A stage's output from its :data:`METRICS` file (one this job's stage wrote)."""
    d = json.loads(data)
    cls = _OUTPUTS[d.pop("kind")]
    if "measured" in d:
        d["measured"] = Measured(**d["measured"])
    return cls(**d)


@dataclass
class CheckpointOutput:
    """A resumable checkpoint of the purify stage: the purifier's torch state (:data:`STATE`) and its JSON
    logs (:data:`LOGS`); the step and the step's record go to Ray as the report's metrics."""

    state: dict
    logs: dict

    def files(self) -> dict[str, bytes]:
        import io

        import torch

        buf = io.BytesIO()
        torch.save(self.state, buf)
        return {STATE: buf.getvalue(), LOGS: json.dumps(self.logs).encode()}

    @classmethod
    def read(cls, folder) -> CheckpointOutput | None:
        """The checkpoint in `folder` (a Ray checkpoint's directory), or None where it holds none (the
        Fisher stage's last report). The state is one this job wrote, and is still read with
        ``weights_only=True``."""
        from pathlib import Path

        import torch

        state_path = Path(folder) / STATE
        if not state_path.is_file():
            return None
        logs = json.loads((Path(folder) / LOGS).read_text())
        return cls(torch.load(state_path, map_location="cpu", weights_only=True), logs)
