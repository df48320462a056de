"""The stages, as functions that run inside each Ray Train worker (or in-process).

Every stage takes Ray's ``train_loop_config``, ``{"context": StageContext}``: the job's config as it
is, plus what the driver resolved once (run name, where the Fisher goes, the attack record). It
reports its metrics and the files it produced as the checkpoint of its last ``report``; the driver
keeps each file and logs it. Its output is a type of :mod:`pipeline.artifacts` (before/after figures as
structure). To add a stage, write its function here and add one line to ``pipeline.driver.STAGES``.

- :func:`fisher_stage`: each rank sums per-sample squared gradients over its share of the clean
  shards; sums and counts are all-reduced; rank 0 writes ``Fbar``. The suspect model is also
  evaluated on the test shards (ACC, and ASR/RA in benchmark mode).
- :func:`purify_stage`: FIP / Fast FIP fine-tuning with DDP over the workers, checkpoints, resume
  from the latest checkpoint, periodic and final evaluation.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from fip.fisher import FisherDiag, squared_grad_sums, trainable_params
from fip.inputs import ADAPTER_KEY, NORMALIZATION_KEY
from fip.io import LoadedModel, save_model
from fip.purify import Purifier, PurifyConfig, augments, crop_prob_at, finalize_model, prepare_model
from fip.tasks import Task, task_named
from fip.training import augment_batch, derive_seed, generator
from lab.attacks import Attack
from lab.backdoor import RECORD_LINK_KEY
from pipeline.artifacts import (
    FISHER,
    HISTORY,
    METRICS,
    PURIFIED,
    PURIFIED_SIDECAR,
    CheckpointOutput,
    FisherOutput,
    Measured,
    PurifyOutput,
    encode_output,
)
from pipeline.config import JobConfig
from pipeline.evaluation import evaluate_shards
from pipeline.shards import (
    RankStream,
    ShardSource,
    default_transform,
    open_shards,
    rank_loader,
    train_transform_for,
)
from pipeline.storage import Storage
from pipeline.suspect import load_suspect
from pipeline.text_backdoor import TextBackdoor, measured_attack
from pipeline.transforms import (
    TRANSFORM_KEY,
    batch_to_device,
    mixed_precision,
    prepare_for_device,
)
from pipeline.workers import (
    all_reduce_sum,
    broadcast_,
    checkpoint,
    device,
    log,
    report,
    restore,
    sync_buffers,
    world,
    wrap_ddp,
)


@dataclass
class StageContext:
    """What every worker receives: the job's config unchanged, and the driver's resolved paths and record."""

    job: JobConfig
    run_name: str
    fisher_url: str
    cache_dir: str
    attack_record: dict | None = None
    attack_tensors: dict = field(default_factory=dict)  # a learned trigger, shipped with the record
    relay: object | None = None  # a Ray queue to the driver's terminal; None: print

    def log(self, event: str | dict) -> None:
        """Progress from rank 0: a line, or a step record the driver shows as a bar."""
        if world()[0] != 0:
            return
        if self.relay is not None:
            self.relay.put_nowait(event)
        elif isinstance(event, str):
            log(event)

    @cached_property
    def store(self) -> Storage:
        return Storage(self.job.storage)

    @cached_property
    def attack(self) -> Attack | TextBackdoor | None:
        """What benchmark mode measures with, made once per worker (a text record's shards and tokenizer fetched)."""
        return measured_attack(self.attack_record, self.attack_tensors, self.store, self.cache_dir) \
            if self.attack_record else None

    def suspect(self) -> LoadedModel:
        """The suspect model as :func:`pipeline.suspect.load_suspect` loads it with the job's model settings:
        it adapts and normalises its inputs itself, so shards, transforms and triggers all stay in [0, 1]."""
        loaded = load_suspect(self.store.fetch(self.job.inputs.model, self.cache_dir), self.job.model)
        self.__dict__["task"] = task_named(loaded.spec.task)  # what `task` would load the model again for
        return loaded

    @cached_property
    def task(self) -> Task:
        """The suspect's task (:mod:`fip.tasks`): what its samples, loss and figures are."""
        return task_named(self.suspect().spec.task)

    def test_shards(self) -> ShardSource | None:
        return open_shards(self.job.inputs.test, self.store) if self.job.inputs.test else None

    def evaluate(self, model, limit: int | None = None) -> dict[str, float]:
        test = self.test_shards()
        if test is None:
            return {}
        with mixed_precision(next(model.parameters()).device):
            return evaluate_shards(model, test, self.attack, limit, self.job.run.skip_corrupt,
                                   self.job.resources.loader_processes(), task=self.task)


def _context(config: dict) -> StageContext:
    ctx: StageContext = config["context"]
    torch.set_num_threads(ctx.job.resources.threads_per_worker)
    return ctx


def _percent(metrics: dict[str, float]) -> str:
    """Figures for the terminal: rates as percentages, a language model's perplexity as it is."""
    return ", ".join(f"{k} {100 * v:.2f}%" if k in ("acc", "acc_per_sequence", "asr", "ra", "false_trigger") else f"{k} {v:.4g}"
                     for k, v in metrics.items())


# ---------------------------------------------------------------- stage 1: Fisher
def fisher_stage(config: dict) -> dict:
    """Diagonal Fisher of the (prepared) suspect model over the clean shards; rank 0 writes it."""
    ctx = _context(config)
    job, pcfg = ctx.job, ctx.job.purify
    rank, size = world()
    start = time.perf_counter()
    dev = device()
    loaded = ctx.suspect()
    task = task_named(loaded.spec.task)
    suspect = prepare_for_device(loaded.model, dev)
    work = prepare_model(suspect, pcfg)
    params = trainable_params(work)
    est = FisherDiag.zeros_like(params, pcfg.fisher_kind)
    stream = RankStream(open_shards(job.inputs.clean, ctx.store), rank, size, skip_corrupt=job.run.skip_corrupt,
                        limit=pcfg.fisher_samples, as_uint8=True)
    # the true Fisher's labels are drawn on the model's device
    labels = torch.Generator(device=dev).manual_seed(derive_seed(pcfg.seed, "fisher-labels", rank))
    padding = 0
    for x, y, pad in rank_loader(stream, 64, job.resources.loader_processes(), pin_memory=dev.type == "cuda"):
        padding += int(pad.sum())
        x, y = batch_to_device(x[~pad], dev), y[~pad].to(dev)
        if len(y):
            with mixed_precision(dev):
                est.add_(squared_grad_sums(work, x, y, pcfg.fisher_kind, params, generator=labels, task=task), len(y))
    count = all_reduce_sum(torch.tensor([float(est.count)], dtype=torch.float64))
    skipped = int(all_reduce_sum(torch.tensor([stream.skipped(padding)], dtype=torch.int64)).item())  # every rank's
    for t in est.sums.values():
        all_reduce_sum(t)
    est.count = int(count.item())
    if est.count == 0:
        raise ValueError(f"no clean samples reached the Fisher estimate from {job.inputs.clean}")
    ctx.log(f"Fisher over {est.count} clean samples on {size} worker(s): Tr(Fbar) = {est.trace():.4g} "
            f"({time.perf_counter() - start:.1f}s)")
    before = ctx.evaluate(suspect)
    if before:
        ctx.log("suspect model: " + _percent(before))
    output = FisherOutput(est.count, est.trace(), skipped, time.perf_counter() - start, Measured(before=before))
    files = None
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            data = est.save(Path(tmp) / FISHER).read_bytes()
        ctx.store.write_bytes(ctx.fisher_url, data)
        files = {FISHER: data, METRICS: encode_output(output)}
    report(output.metrics(), files)
    return output.metrics()


# ---------------------------------------------------------------- stage 2: FIP fine-tuning
def step_batches(ctx: StageContext, rank: int, size: int, first_step: int, dev: torch.device | None = None,
                 augment: bool | None = None):
    """Endless (step, x, y) over this rank's clean shards, epoch after epoch, from `first_step` on.

    x is on `dev` (default: the CPU) as the model takes it (float images, or token ids); with `augment` (default:
    ``purify.augment``; a language model's sequences are never augmented) shards of varying image size go
    through the train transform (random-resized crop + flip) in the loader's workers, FIP's batch crop on top."""
    pcfg, job = ctx.job.purify, ctx.job
    augment = pcfg.augment if augment is None else augment
    dev = torch.device(dev or "cpu")
    if pcfg.batch_size % size:
        raise ValueError(f"global batch {pcfg.batch_size} is not divisible by {size} workers")
    local = pcfg.batch_size // size
    source = open_shards(job.inputs.clean, ctx.store)
    stream = RankStream(source, rank, size, shuffle=True, seed=pcfg.seed, skip_corrupt=job.run.skip_corrupt,
                        transform=train_transform_for(source.manifest) if augment else None, as_uint8=True)
    per_epoch = max(1, len(stream) // local)
    step = first_step
    epoch, skip = divmod(first_step, per_epoch)
    while True:
        stream.set_epoch(epoch)
        for i, (x, y, _pad) in enumerate(rank_loader(stream, local, job.resources.loader_processes(),
                                                     pin_memory=dev.type == "cuda")):
            if i >= per_epoch:
                break  # drop the short tail batch: every step has the full global batch
            if i < skip:
                continue
            x = batch_to_device(x, dev)
            if augment:
                x = augment_batch(x, generator(pcfg.seed, "augment", step, rank), pcfg.augment_pad,
                                  crop_prob_at(pcfg, step))
                if dev.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
            yield step, x, y
            step += 1
        skip = 0
        epoch += 1


def _load_fbar(ctx: StageContext, params: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank 0 reads Fbar and broadcasts it, so every rank regularises towards the same weights."""
    if rank == 0:
        fisher = FisherDiag.load(ctx.store.fetch(ctx.fisher_url, ctx.cache_dir))
        missing = set(params) - set(fisher.sums)
        if missing:
            raise ValueError(f"Fisher file {ctx.fisher_url} lacks {sorted(missing)[:3]}: estimated for another model?")
        fbar = {n: t.to(params[n].device) for n, t in fisher.mean().items() if n in params}
    else:
        fbar = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
    for name in sorted(fbar):
        broadcast_(fbar[name])
    return fbar


def _fault_injection(ctx: StageContext, step: int, resumed: bool, rank: int, size: int) -> None:
    """Tests only (``run.fail_at_step``): the last rank dies once, with no cleanup, as a crashed worker would."""
    if ctx.job.run.fail_at_step == step and not resumed and rank == size - 1:
        time.sleep(5)  # let the controller's health check (every 2 s) see the worker alive first
        print(f"[fip] fault injection: rank {rank} exits at step {step}", flush=True)
        os._exit(1)


def resumed_seconds(logs: dict, now: float) -> float:
    """`purify_seconds` so far when resuming from a checkpoint's `logs`: its count plus the wall time since
    it was written (steps done after it and lost, the failure, the restart), so the figure counts every
    attempt rather than the last one. Takes the checkpoint's ``saved_at`` out of `logs`."""
    saved_at = logs.pop("saved_at", None)
    return float(logs["seconds"]) + (max(0.0, now - saved_at) if saved_at is not None else 0.0)


def purify_stage(config: dict) -> dict:
    """FIP / Fast FIP with DDP over the Ray Train workers; resumes from the latest checkpoint."""
    ctx = _context(config)
    pcfg: PurifyConfig = ctx.job.purify
    run = ctx.job.run
    rank, size = world()
    dev = device()
    suspect = ctx.suspect()
    task = task_named(suspect.spec.task)
    work = prepare_model(prepare_for_device(suspect.model, dev), pcfg)
    fbar = _load_fbar(ctx, trainable_params(work), rank)
    purifier = Purifier(work, fbar, pcfg, logits_fn=wrap_ddp(work), rank=rank, task=task)
    logs: dict = {"history": [], "evaluations": [], "seconds": 0.0}
    resumed = restore()
    if resumed is not None:
        state, logs = resumed
        purifier.load_state_dict(state)
        logs["seconds"] = resumed_seconds(logs, time.time())
        ctx.log(f"resumed from checkpoint at step {purifier.step_count}")
    start, first_step = time.perf_counter(), purifier.step_count

    def elapsed() -> float:  # over every attempt, not only this one
        return logs["seconds"] + time.perf_counter() - start

    for step, x, y in step_batches(ctx, rank, size, purifier.step_count, dev, augments(pcfg, task)):
        if step >= pcfg.iterations:
            break
        _fault_injection(ctx, step, resumed is not None, rank, size)
        with mixed_precision(dev):  # bf16 on CUDA; the CPU stays fp32
            record = purifier.step(x, y.to(dev))
        logs["history"].append(record)
        done = purifier.step_count
        if done % run.log_every == 0 or done == pcfg.iterations:
            rate = (done - first_step) / max(time.perf_counter() - start, 1e-9)
            if ctx.relay is not None:
                ctx.log({"step": done, "total": pcfg.iterations, "ce": record["ce"], "rate": rate})
            else:
                ctx.log(f"step {done}/{pcfg.iterations} ce {record['ce']:.4f} total {record['total']:.4f}"
                        + (f" trace {record['trace']:.4g}" if "trace" in record else "")
                        + f" ({rate:.2f} steps/s, {(pcfg.iterations - done) / max(rate, 1e-9):.0f}s left)")
        if pcfg.eval_every and done % pcfg.eval_every == 0 and done < pcfg.iterations:
            sync_buffers(work)
            metrics = ctx.evaluate(finalize_model(copy.deepcopy(work), pcfg), limit=run.eval_samples)
            logs["evaluations"].append({"step": done, **metrics})
            ctx.log(f"eval at step {done}: " + _percent(metrics))
        if done % run.checkpoint_every == 0 and done < pcfg.iterations:
            checkpoint(CheckpointOutput(purifier.state_dict(), {**logs, "seconds": elapsed(), "saved_at": time.time()}),
                       {"step": done, **{k: v for k, v in record.items() if k != "step"}})
    sync_buffers(work)
    purified = finalize_model(work, pcfg)
    after = ctx.evaluate(purified)
    if after:
        logs["evaluations"].append({"step": pcfg.iterations, **after})
        ctx.log("purified model: " + _percent(after))
    logs["seconds"] = elapsed()
    output = PurifyOutput(purifier.step_count, logs["seconds"], Measured(after=after))
    files = None
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = open_shards(ctx.job.inputs.clean, ctx.store).manifest
            train = train_transform_for(manifest)
            # a lab suspect's link to its attack record stays with the purified model (lab.backdoor.check_record_belongs)
            lab_link = {k: suspect.metadata[k] for k in (RECORD_LINK_KEY,) if suspect.metadata.get(k)}
            inputs = {NORMALIZATION_KEY: suspect.metadata.get(NORMALIZATION_KEY),  # None: [0, 1] inputs as they are
                      ADAPTER_KEY: suspect.metadata.get(ADAPTER_KEY),
                      TRANSFORM_KEY: {"eval": default_transform(manifest).describe(),
                                      "train": train.describe() if train is not None else None}}
            path = save_model(purified.cpu(), suspect.spec, Path(tmp) / PURIFIED,
                              {"source_sha256": suspect.sha256, "method": pcfg.method, "run_name": ctx.run_name,
                               **inputs, **lab_link})
            files = {PURIFIED: path.read_bytes(), PURIFIED_SIDECAR: path.with_suffix(".json").read_bytes(),
                     HISTORY: json.dumps(logs).encode(), METRICS: encode_output(output)}
    report(output.metrics(), files)
    return output.metrics()

