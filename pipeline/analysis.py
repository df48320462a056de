"""What the driver draws and measures after training: loss curves, and the Hessian spectral density
of the suspect and purified models (the paper's smoothness evidence)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fip.tasks import CLASSIFICATION, Task
from pipeline.artifacts import Measured
from pipeline.config import AnalysisSettings
from pipeline.shards import ShardSource, read_all
from pipeline.transforms import model_input


def plot_curves(history: list[dict], evaluations: list[dict], path: Path) -> Path:
    """Loss terms per step, and ACC/ASR at each evaluation, to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [h["step"] for h in history]
    for key in ("ce", "total"):
        a.plot(steps, [h[key] for h in history], label=key, lw=0.8)
    tr = [(h["step"], h["trace"]) for h in history if "trace" in h]
    if tr:
        a2 = a.twinx()
        a2.plot(*zip(*tr, strict=True), color="tab:red", lw=0.8, label="Tr(F)")
        a2.set_ylabel("Tr(F)")
    a.set_xlabel("step")
    a.set_title("FIP loss terms")
    a.legend(loc="upper left")
    for key in ("acc", "asr", "ra"):
        pts = [(e["step"], 100 * e[key]) for e in evaluations if key in e]
        if pts:
            b.plot(*zip(*pts, strict=True), marker="o", label=key.upper())
    b.set_xlabel("step")
    b.set_ylabel("%")
    b.set_ylim(-2, 102)
    b.set_title("ACC / ASR during purification")
    if b.get_legend_handles_labels()[0]:  # a job without a test set has no evaluations to label
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def spectral_analysis(suspect: nn.Module, purified: nn.Module, clean: ShardSource, settings: AnalysisSettings,
                      seed: int, path: Path, task: Task = CLASSIFICATION) -> Measured:
    """lambda_max of both models from an SLQ density on a few clean samples (the Hessian of the task's loss),
    plotted to `path` (off at 0: nothing measured)."""
    if not settings.esd_samples or not settings.esd_steps:
        return Measured()
    from fip.smoothness import HessianOperator, plot_spectral_density, spectral_density

    x, y, _ = read_all(clean, limit=settings.esd_samples)
    batch = [(model_input(x), y)]
    densities, out = {}, Measured()
    for label, figures, model in (("suspect", out.before, suspect), ("purified", out.after, purified)):
        esd = spectral_density(HessianOperator(model, batch, task.mean_nll), runs=1, steps=settings.esd_steps,
                               seed=seed)
        densities[label] = esd
        figures["lambda_max"] = float(esd.nodes.max())
    plot_spectral_density(densities, path, title="Hessian eigenvalue density (SLQ)")
    return out
