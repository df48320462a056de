"""The one way a model file enters the pipeline to run on data.

Every place that loads a suspect or purified model to run it (the job's plan and stages, the sweep's trials,
``fip evaluate``, ``fip smoothness``, the registry) goes through :func:`load_suspect` or
:func:`load_purified`. Loading builds the architecture (the file's own spec, or the one ``model.arch`` names),
fits the weights, refuses NaN or infinite ones (suspects), and attaches the model's input side
(:mod:`fip.inputs`): the input adapter and normalisation its metadata records, or that the settings ask for.
The metadata of the returned model holds the effective input side, so a purified model saved with it
(:mod:`pipeline.stages`) runs the same from its file alone. A bare :func:`fip.io.load_model` would score a
normalising model on un-normalised inputs.
"""

from __future__ import annotations

from pathlib import Path

from fip.inputs import ADAPTER_KEY, NORMALIZATION_KEY, InputAdapter, Normalization, attach_inputs, data_shape
from fip.io import LoadedModel, load_model
from fip.models import ModelSpec, spec_for
from pipeline.config import ModelSettings


def requested_spec(settings: ModelSettings) -> ModelSpec | None:
    """The spec `settings` name (None: the file's own), with the family's defaults for what they leave out."""
    if settings.arch is None:
        return None
    return spec_for(settings.arch, num_classes=settings.num_classes, in_channels=settings.in_channels,
                    image_size=settings.image_size, options=settings.options or None)


def input_metadata(spec: ModelSpec, metadata: dict, settings: ModelSettings) -> dict:
    """`metadata` with the input side `settings` ask for over what the file records."""
    out = dict(metadata)
    norm = settings.normalize.strip().lower()
    if norm == "off":
        out[NORMALIZATION_KEY] = None
    elif norm != "auto":
        out[NORMALIZATION_KEY] = Normalization.parse(settings.normalize).for_channels(spec.in_channels).to_metadata()
    if settings.data_shape is not None:
        out[ADAPTER_KEY] = InputAdapter.parse(settings.data_shape).to_metadata()
    return out


def _load(path: str | Path, settings: ModelSettings, check_finite: bool) -> LoadedModel:
    loaded = load_model(path, requested_spec(settings), check_finite=check_finite)
    metadata = input_metadata(loaded.spec, loaded.metadata, settings)
    attach_inputs(loaded.model, loaded.spec.input_shape, metadata)
    return LoadedModel(loaded.model, loaded.spec, metadata, loaded.sha256)


def load_suspect(path: str | Path, settings: ModelSettings | None = None) -> LoadedModel:
    """A suspect model as every stage meets it: built as `settings` say (or as its file says), finite weights
    only, taking ``[0, 1]`` images of :func:`accepted_shape`; one-line ``ValueError`` for every problem."""
    return _load(path, settings or ModelSettings(), check_finite=True)


def load_purified(path: str | Path) -> LoadedModel:
    """A purified model written by the pipeline: its file records the spec and the input side. Non-finite
    weights are left to the acceptance check, which names them in its verdict."""
    return _load(path, ModelSettings(), check_finite=False)


def accepted_shape(loaded: LoadedModel) -> tuple[int, int, int]:
    """The ``(C, H, W)`` images a loaded model takes: its input adapter's, else its network's."""
    return data_shape(loaded.spec.input_shape, loaded.metadata)
