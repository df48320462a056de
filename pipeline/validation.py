"""The driver's pre-flight check of a job's shards, before Ray starts.

A bad shard found inside a Ray Train worker costs a cluster start and a stage, and reaches the user
only after that; most are found here in a second or two instead. Every shard's first sample is read
(an empty, garbage or non-tar file, a malformed first sample, an image that does not match the
manifest), and whole shards are read, in order, up to a budget of samples: for a D_val-sized clean set
and a test set of a few thousand images that is all of them, so counts, labels, images and per-shard
SHA-256 are all checked before any worker starts. Larger sets are checked the rest of the way by the
workers' own reader (the same checks, :func:`pipeline.shards.iter_range`), whose errors are not retried
(:mod:`pipeline.failures`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fip.families import max_positions
from fip.io import LoadedModel
from fip.tasks import CAUSAL_LM
from lab.backdoor import check_record_belongs
from pipeline.shards import ShardSource, iter_range
from pipeline.suspect import accepted_shape
from pipeline.text_backdoor import is_text_record


class JobError(ValueError):
    """The job was refused before any worker started (inputs do not fit together)."""


FULL_CHECK_SAMPLES = 20_000  # per shard set: read whole shards while the running count stays within this


def check_shards(sources: dict[str, ShardSource], skip_corrupt: bool = False,
                 full_check_samples: int = FULL_CHECK_SAMPLES, threads: int = 4) -> None:
    """Read what the pre-flight reads of each shard set (see the module docstring); the first problem is
    raised as the reader raises it (a one-line ``ShardError`` naming the shard and sample). With
    `skip_corrupt` the job reads past bad samples, so there is nothing to refuse here."""
    if skip_corrupt:
        return
    for source in sources.values():
        ranges, offset = [], 0
        for count in source.counts:
            whole = offset + count <= full_check_samples
            ranges.append((offset, offset + (count if whole else 1)))
            offset += count
        pool = ThreadPoolExecutor(max(1, min(threads, len(ranges))))
        try:
            futures = [pool.submit(_read, source, a, b) for a, b in ranges]
            for f in futures:  # in shard order: the first bad shard is the one named
                f.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _read(source: ShardSource, start: int, stop: int) -> None:
    for _ in iter_range(source, start, stop):
        pass


def check_model_fits(suspect: LoadedModel, num_classes: int, image_shape: Sequence[int], role: str,
                     model: str) -> None:
    """Refuse data the model cannot read, in one line: another number of classes (labels out of its range, or
    a silently wrong accuracy), channels or image size (a convolution error deep in a worker). Every command
    that runs a model on data calls this first (purify, evaluate, tune), with a shard manifest's
    ``num_classes`` and ``image_shape`` (what its readers yield), or a data set's. The shape the model takes
    is its input adapter's where it has one (:func:`pipeline.suspect.accepted_shape`)."""
    spec = suspect.spec
    shape = tuple(int(v) for v in image_shape)
    expected = accepted_shape(suspect)
    if num_classes != spec.num_classes:
        raise JobError(f"{role} have {num_classes} classes but the model {model} has {spec.num_classes}")
    if shape != expected:
        hint = "" if expected != spec.input_shape else \
            f"; a model of another input geometry takes them with --data-shape {','.join(map(str, shape))}"
        raise JobError(f"{role} hold {shape} images but the model {model} expects {expected} "
                       f"({expected[0]} channel(s), {expected[1]}x{expected[2]}){hint}")


TASK_WORDS = {"classification": "images with class labels", "causal-lm": "text (token sequences)"}


def check_task_fits(suspect: LoadedModel, manifest, role: str, model: str) -> None:
    """Refuse shards of another task than the model's (text for an image classifier, or the reverse), and text
    the language model cannot read: token ids beyond its vocabulary, sequences longer than its positions."""
    spec = suspect.spec
    if manifest.task != spec.task:
        raise JobError(f"{role} hold {TASK_WORDS.get(manifest.task, manifest.task)} but the model {model} is "
                       f"{'a language model' if spec.task == 'causal-lm' else 'an image classifier'}")
    if spec.task != "causal-lm":
        return
    tok = manifest.tokenizer
    if tok.vocab_size > spec.num_classes:
        raise JobError(f"{role} were tokenised with {tok.name} ({tok.vocab_size} tokens) but the model {model} has a "
                       f"vocabulary of {spec.num_classes}: its token ids would not fit")
    positions = max_positions(spec)
    if positions is not None and manifest.max_length > positions:
        raise JobError(f"{role} hold sequences of {manifest.max_length} tokens but the model {model} reads at most "
                       f"{positions}: rewrite them with fip shard text --max-length {positions}")


def check_clean_is_not_test(clean: ShardSource, test: ShardSource, clean_url: str, test_url: str) -> None:
    """Refuse test data given as the defender's D_val (or sharing shards with it): whatever the job then
    reports on the test set was trained on, and in a sweep the test set would leak into the choice. Shards are
    the same when their resolved URLs are, or their manifests record the same SHA-256."""
    same_urls = set(clean.urls) & set(test.urls)
    same_hashes = {s.sha256 for s in clean.manifest.shards if s.sha256} & {s.sha256 for s in test.manifest.shards}
    if same_urls or same_hashes:
        how = f"{len(same_urls)} shard URL(s)" if same_urls else f"{len(same_hashes)} shard(s) by SHA-256"
        raise JobError(f"clean shards {clean_url} and test shards {test_url} share {how}: the defender's D_val "
                       "must not be test data; pass test shards written apart from D_val")


def check_inputs(suspect: LoadedModel, model_url: str, *, clean: ShardSource | None = None, clean_url: str = "",
                 test: ShardSource | None = None, test_url: str = "", record: dict | None = None,
                 record_url: str = "") -> list[str]:
    """The checks every command that runs a model on data makes first (``fip purify`` through
    :func:`pipeline.plan.plan_job`, ``fip tune``, ``fip evaluate``), in one order: the model against each
    shard set, D_val against the test data, and the attack record against the model (its link, its classes).
    Raises the first problem in one line; returns the warnings to show (a link that cannot be checked)."""
    spec = suspect.spec
    for role, source in (("clean shards", clean), ("test shards", test)):
        if source is not None:
            check_task_fits(suspect, source.manifest, role, model_url)
            if spec.task == "classification":
                check_model_fits(suspect, source.manifest.num_classes, source.manifest.image_shape, role, model_url)
    if clean is not None and test is not None:
        check_clean_is_not_test(clean, test, clean_url, test_url)
    if record is None:
        return []
    text_model, text_record = spec.task == CAUSAL_LM.name, is_text_record(record)
    if text_model != text_record:
        kind = ("an image classifier", "a language model")
        raise JobError(f"attack record {record_url} describes {kind[text_record]}'s backdoor, and {model_url} is "
                       f"{kind[text_model]}: pass the record made for it (docs/language-models.md, "
                       "\"ASR in benchmark mode\")")
    warning = check_record_belongs(suspect.metadata, record, model_url, record_url)
    rec_classes = record.get("model_spec", {}).get("num_classes")
    if rec_classes not in (None, spec.num_classes):
        raise JobError(f"attack record {record_url} is for {rec_classes} classes, the model has {spec.num_classes}")
    return [warning] if warning else []


def check_batch_fits(batch_size: int, clean_total: int, clean_url: str) -> None:
    """A global batch larger than D_val would be cut short on every step without a word: refuse it."""
    if batch_size > clean_total:
        raise JobError(f"batch_size {batch_size} is larger than the {clean_total} clean samples in {clean_url}: "
                       f"pass --batch-size {clean_total} or less")
