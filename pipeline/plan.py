"""A job's plan, made before Ray starts: the inputs checked against each other, every path resolved, the
attack record read, so that the workers receive one self-contained config and a bad input costs no
cluster start. Also the one reader of attack records, which the driver, the sweep and ``fip evaluate``
share.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fip.io import LoadedModel
from lab.attacks import Attack
from pipeline.artifacts import FISHER
from pipeline.config import JobConfig
from pipeline.ray_runtime import check_local_cpus
from pipeline.shards import ShardSource, open_shards
from pipeline.stages import StageContext
from pipeline.storage import Storage, absolute_url, is_s3, join
from pipeline.suspect import load_suspect
from pipeline.text_backdoor import TextBackdoor, is_text_record, measured_attack, resolve_text_record
from pipeline.tracking import local_root
from pipeline.validation import JobError, check_batch_fits, check_inputs, check_shards


@dataclass(frozen=True)
class AttackRecord:
    """An attack record as the lab wrote it, with its learned trigger's tensors (empty for a fixed trigger), or a
    language model's record (:mod:`pipeline.text_backdoor`): what benchmark mode needs to measure ASR."""

    url: str
    record: dict
    tensors: dict = field(default_factory=dict)

    def attack(self, store: Storage, cache_dir: str | Path) -> Attack | TextBackdoor:
        return measured_attack(self.record, self.tensors, store, cache_dir)


def load_attack_record(url: str, store: Storage, cache_dir: str | Path) -> AttackRecord:
    """Read the record at `url` and fetch its trigger file (into `cache_dir`) where it names one; a language
    model's record has its triggered prompts' URL made absolute."""
    try:
        record = json.loads(store.read_bytes(url))
    except json.JSONDecodeError as e:
        raise JobError(f"attack record {url} is not JSON ({e})") from e
    if not isinstance(record, dict):
        raise JobError(f"attack record {url} holds a {type(record).__name__}, not an object")
    if is_text_record(record):
        return AttackRecord(url, resolve_text_record(record, url))
    tensors = {}
    if record.get("trigger_path"):
        from safetensors.torch import load_file

        tensors = load_file(store.fetch(record["trigger_path"], cache_dir))
    return AttackRecord(url, record, tensors)


@dataclass
class JobPlan:
    """What :func:`plan_job` resolved: the normalised config, the stages' context and the local outputs."""

    config: JobConfig
    context: StageContext
    suspect: LoadedModel
    clean: ShardSource
    out_dir: Path
    storage_path: str
    warnings: list[str] = field(default_factory=list)  # one line each, shown before the job starts


def plan_job(cfg: JobConfig) -> JobPlan:
    """Refuse mismatched inputs before Ray starts (model vs shards: classes, image shape; sizes) and
    resolve every path the workers will need, so they receive one self-contained config."""
    inputs, run = cfg.inputs, cfg.run
    cfg = cfg.replace(inputs={k: absolute_url(v) for k, v in vars(inputs).items()},
                      run={"work_dir": run.work_dir if is_s3(run.work_dir) else str(Path(run.work_dir).resolve()),
                           "run_name": run.run_name or f"{cfg.purify.method}-{time.strftime('%Y%m%d-%H%M%S')}"
                                                       f"-{uuid.uuid4().hex[:6]}"})
    inputs = cfg.inputs
    store = Storage(cfg.storage)
    cache_dir = str(local_root(cfg.run.work_dir) / "cache")
    suspect = load_suspect(store.fetch(inputs.model, cache_dir), cfg.model)
    clean = open_shards(inputs.clean, store)
    test = open_shards(inputs.test, store) if inputs.test else None
    attack = load_attack_record(inputs.attack_record, store, cache_dir) if inputs.attack_record else None
    warnings = check_inputs(suspect, inputs.model, clean=clean, clean_url=inputs.clean, test=test,
                            test_url=inputs.test or "", record=attack.record if attack else None,
                            record_url=inputs.attack_record or "")
    sources = {"clean": clean, **({"test": test} if test is not None else {})}
    check_shards(sources, cfg.run.skip_corrupt)  # first samples, and whole small sets, before any worker starts
    if clean.total < cfg.resources.workers:
        raise JobError(f"{clean.total} clean samples cannot be split across {cfg.resources.workers} workers")
    # what the job asks of the data and the machine, after the inputs: a bad file is the first thing to fix
    check_batch_fits(cfg.purify.batch_size, clean.total, inputs.clean)
    check_local_cpus(cfg.resources)
    work = join(cfg.run.work_dir, cfg.run.run_name)
    out_dir = Path(work) if not is_s3(work) else local_root(cfg.run.work_dir) / "jobs" / cfg.run.run_name
    context = StageContext(cfg, cfg.run.run_name, join(work, FISHER), cache_dir,
                           attack.record if attack else None, attack.tensors if attack else {})
    storage_path = cfg.run.storage_path or join(cfg.run.work_dir, "ray")
    return JobPlan(cfg, context, suspect, clean, out_dir, storage_path, warnings)
