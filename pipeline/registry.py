"""The one way a purified model enters the MLflow registry, for a job (:mod:`pipeline.driver`) and for a
sweep's winner (:mod:`tuning.sweep`): a new version tagged with its source, its method and, in benchmark
mode, its test figures, then ``@candidate`` offered to it under the house rule
(:meth:`pipeline.tracking.Tracker.offer_candidate`, docs/registry.md).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fip.families import split_arch
from fip.inputs import ADAPTER_KEY, NORMALIZATION_KEY, Normalization
from fip.io import LoadedModel
from pipeline.artifacts import Measured
from pipeline.shards import ShardSource
from pipeline.storage import Storage
from pipeline.suspect import accepted_shape
from pipeline.tracking import Registered, Tracker


def metric_tags(measured: Measured) -> dict[str, str]:
    """The registry tags of a model measured in benchmark mode (ACC, ASR, RA and, with the suspect's
    figures, DER); the ones not measured are left out. One spelling for every registered version,
    whether a job or a sweep registers it."""
    from lab.metrics import defense_effectiveness_rating

    before, after = measured.before, measured.after
    tags = {tag: f"{after[key]:.4f}" for key, tag in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA"))
            if after.get(key) is not None}
    if all(d.get(k) is not None for d in (before, after) for k in ("acc", "asr")):
        der = defense_effectiveness_rating(before["acc"], before["asr"], after["acc"], after["asr"])
        tags["DER"] = f"{der:.4f}"
    return tags


def registry_tags(source_sha256: str, method: str, measured: Measured, **extra: str) -> dict[str, str]:
    """Every registered version's tags: the suspect's hash (the candidate rule compares by source), the
    method, the benchmark figures, and what the caller adds (a sweep: its run, trial and objective)."""
    return {**extra, "method": method, **metric_tags(measured), "source_sha256": source_sha256}


def input_description(loaded: LoadedModel) -> dict:
    """What the registered model's MLmodel file says about its input: the data as the user has it, in [0, 1],
    with the adapter and normalisation that the model applies itself; a language model's: prompts as text."""
    if loaded.spec.task == "causal-lm":
        return {"input": "prompts as text; mlflow.pyfunc generates their answers (params: max_new_tokens, do_sample)",
                "arch": loaded.spec.arch, "vocab_size": loaded.spec.num_classes, "fip_task": loaded.spec.task}
    shape = accepted_shape(loaded)
    return {"input": f"float32 images in [0, 1], shape (N, {', '.join(map(str, shape))}); the model resizes and "
                     "normalises them itself (input_adapter, input_normalization)",
            "arch": loaded.spec.arch, "num_classes": loaded.spec.num_classes, "network_input": list(loaded.spec.input_shape),
            NORMALIZATION_KEY: loaded.metadata.get(NORMALIZATION_KEY), ADAPTER_KEY: loaded.metadata.get(ADAPTER_KEY)}


BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as the image processor's config stores it


def _hf_image_classifier(loaded: LoadedModel) -> bool:
    return split_arch(loaded.spec.arch)[0] == "hf" and loaded.spec.task == "classification"


def transformers_processor(loaded: LoadedModel) -> dict | None:
    """ViTImageProcessor settings that feed an HF image classifier as the registered pytorch model feeds itself:
    RGB at the network's size, scaled to [0, 1], then its normalisation. None for the other families, language
    models, and networks that do not take 3 channels (transformers' image pipeline makes every image RGB)."""
    spec = loaded.spec
    if not _hf_image_classifier(loaded) or spec.input_shape[0] != 3:
        return None
    norm = Normalization.from_metadata(loaded.metadata)
    norm = norm.for_channels(3) if norm is not None else None
    return {"do_resize": True, "size": {"height": spec.input_shape[1], "width": spec.input_shape[2]},
            "resample": BILINEAR, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
            "do_normalize": norm is not None, "image_mean": list(norm.mean) if norm else None,
            "image_std": list(norm.std) if norm else None}


def tokenizer_for(purified: LoadedModel, clean: ShardSource, store: Storage, into: Path) -> Path | None:
    """A language model's tokenizer, as its clean shards store it (checked against their manifest); None for an
    image model."""
    if purified.spec.task != "causal-lm":
        return None
    from pipeline.text_source import fetch_tokenizer

    return fetch_tokenizer(clean.urls, clean.manifest, store, into)


def register_purified(tracker: Tracker, run_id: str, purified: LoadedModel, path: Path, name: str,
                      tags: dict[str, str], progress: Callable[[str], None], prefix: str = "[fip]",
                      tokenizer: Path | None = None, hold_candidate: str | None = None) -> Registered:
    """A new version of `name` from the run `run_id` (the model, its safetensors file and sidecar; a language
    model with its `tokenizer` folder), then ``@candidate`` moved to it only if it beats the holder and nothing
    holds it back (`hold_candidate`: why not, e.g. the sweep's probe flags it); the URI returned is
    ``NAME@candidate`` when it moved, else the version's own."""
    progress(f"{prefix} registering the purified model as {name}")
    processor = transformers_processor(purified)
    if processor is None and _hf_image_classifier(purified):
        progress(f"{prefix} no transformers flavour for it: its network takes {purified.spec.input_shape[0]} "
                 "channel(s) and transformers' image pipeline feeds RGB (the pytorch flavour serves it)")
    reg = tracker.register(run_id, purified.model, path, accepted_shape(purified), name, tags,
                           model_metadata=input_description(purified), tokenizer=tokenizer, image_processor=processor)
    moved, why = (False, hold_candidate) if hold_candidate else tracker.offer_candidate(name, reg.version, tags)
    progress(f"{prefix} registered {name} version {reg.version}; @candidate "
             + (f"moved to it ({why})" if moved else f"stays ({why})"))
    return Registered(reg.name, reg.version, f"models:/{name}@candidate" if moved else f"models:/{name}/{reg.version}",
                      moved)
