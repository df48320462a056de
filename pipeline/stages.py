"""The distributed stages, as functions that run inside each Ray Train worker (or in-process).

- :func:`fisher_stage`: each rank sums per-sample squared gradients over its share of the clean
  shards; sums and counts are all-reduced; rank 0 writes ``Fbar``. The suspect model is also
  evaluated on the test shards (ACC, and ASR/RA in benchmark mode).
- :func:`purify_stage`: FIP / Fast FIP fine-tuning with DDP over the workers, checkpoints through
  ``ray.train.report``, resume from the latest checkpoint, periodic and final evaluation.

Both take a plain dict (Ray's ``train_loop_config``) built from :class:`StageConfig`. Without a
process group (one worker, or ``ScalingConfig(num_workers=0)``) the collectives are skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fip.fisher import FisherDiag, squared_grad_sums, trainable_params
from fip.io import load_model
from fip.purify import Purifier, PurifyConfig, augment_batch, crop_prob_at, finalize_model, prepare_model
from lab.backdoor import attack_from_record
from pipeline import storage
from pipeline.shards import RankStream, ShardSource, open_shards, rank_loader


@dataclass
class StageConfig:
    """Everything a worker needs; plain data so it travels in Ray's train_loop_config."""

    model_url: str
    clean: str
    test: str | None
    fisher_url: str
    purify: dict
    attack_record: dict | None = None
    attack_tensors: dict | None = None
    threads_per_worker: int = 1
    loader_workers: int = 0
    checkpoint_every: int = 100
    eval_every: int = 0
    eval_samples: int | None = 2000
    skip_corrupt: bool = False
    log_every: int = 10
    fail_at_step: int | None = None  # fault injection for tests: the last rank dies here once
    s3_endpoint: str | None = None
    cache_dir: str = field(default_factory=lambda: os.path.join(tempfile.gettempdir(), "fip-cache"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> StageConfig:
        return cls(**d)


# ---------------------------------------------------------------- worker context
def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(t, src)
    return t


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them only at the start of each forward, so after the last step every rank holds
    statistics updated with its own batch. Each rank evaluates its share of the test shards, so
    without this the reported metrics mix models that differ from the one rank 0 saves.
    """
    for buf in model.buffers():
        broadcast_(buf)


def log(msg: str) -> None:
    """Progress from rank 0 (Ray forwards worker stdout to the driver)."""
    if world()[0] == 0:
        print(f"[fip] {msg}", flush=True)


def _setup(cfg: StageConfig) -> None:
    torch.set_num_threads(max(1, cfg.threads_per_worker))
    if cfg.s3_endpoint:
        os.environ["FIP_S3_ENDPOINT_URL"] = cfg.s3_endpoint


def fetch(url: str, cache_dir: str) -> Path:
    """A local copy of a model or Fisher file (S3 objects are downloaded once per worker node)."""
    if not storage.is_s3(url):
        return Path(url.removeprefix("file://"))
    local = Path(cache_dir) / url.removeprefix("s3://")
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + f".{os.getpid()}.part")
        tmp.write_bytes(storage.read_bytes(url))
        tmp.replace(local)
        sidecar = url.rsplit(".", 1)[0] + ".json"
        if storage.exists(sidecar):
            local.with_suffix(".json").write_bytes(storage.read_bytes(sidecar))
    return local


def _device() -> torch.device:
    try:
        import ray.train.torch

        return ray.train.torch.get_device()
    except Exception:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_shards(model: nn.Module, cfg: StageConfig, limit: int | None = None, batch_size: int = 256) -> dict[str, float]:
    """ACC (and ASR/RA with an attack record) over this rank's share of the test shards, all-reduced."""
    if not cfg.test:
        return {}
    rank, size = world()
    attack = attack_from_record(cfg.attack_record, cfg.attack_tensors) if cfg.attack_record else None
    stream = RankStream(open_shards(cfg.test), rank, size, skip_corrupt=cfg.skip_corrupt, limit=limit)
    device = next(model.parameters()).device
    counts = torch.zeros(4, dtype=torch.float64)  # correct, total, attack hits, attack total(+ra below)
    ra_hits = torch.zeros(1, dtype=torch.float64)
    was = model.training
    model.eval()
    for x, y, pad in rank_loader(stream, batch_size, cfg.loader_workers):
        keep = ~pad
        x, y = x[keep], y[keep]
        if len(y) == 0:
            continue
        counts[0] += float((model(x.to(device)).argmax(1).cpu() == y).sum())
        counts[1] += len(y)
        if attack is not None:
            targets = attack.target_of(y)
            mask = targets != y
            if mask.any():
                preds = model(attack.trigger_floats(x[mask]).to(device)).argmax(1).cpu()
                counts[2] += float((preds == targets[mask]).sum())
                counts[3] += int(mask.sum())
                ra_hits[0] += float((preds == y[mask]).sum())
    model.train(was)
    all_reduce_sum(counts)
    all_reduce_sum(ra_hits)
    out = {"acc": float(counts[0] / max(counts[1], 1))}
    if attack is not None:
        out["asr"] = float(counts[2] / max(counts[3], 1))
        out["ra"] = float(ra_hits[0] / max(counts[3], 1))
    return out


def _in_ray_train() -> bool:
    """Whether this code runs inside a Ray Train worker (else: in-process use, no reporting)."""
    try:
        import ray.train

        ray.train.get_context()
        return True
    except Exception:  # ImportError, or Ray's error for "not in a training session"
        return False


def _report(metrics: dict, files: dict[str, bytes] | None = None) -> None:
    """ray.train.report on every rank (same number of calls); rank 0 attaches a checkpoint folder."""
    if not _in_ray_train():
        return
    import ray.train
    from ray.train import Checkpoint

    if files is not None and world()[0] == 0:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                (Path(tmp) / name).write_bytes(data)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


# ---------------------------------------------------------------- stage 1: Fisher
def fisher_stage(config: dict) -> dict:
    """Diagonal Fisher of the (prepared) suspect model over the clean shards; rank 0 writes it."""
    cfg = StageConfig.from_dict(config)
    _setup(cfg)
    rank, size = world()
    pcfg = PurifyConfig(**cfg.purify)
    start = time.perf_counter()
    suspect = load_model(fetch(cfg.model_url, cfg.cache_dir)).model.to(_device())
    work = prepare_model(suspect, pcfg)
    params = trainable_params(work)
    est = FisherDiag.zeros_like(params, pcfg.fisher_kind)
    stream = RankStream(open_shards(cfg.clean), rank, size, skip_corrupt=cfg.skip_corrupt, limit=pcfg.fisher_samples)
    generator = torch.Generator().manual_seed(pcfg.seed * 7919 + rank)
    for x, y, pad in rank_loader(stream, 64, cfg.loader_workers):
        x, y = x[~pad].to(_device()), y[~pad].to(_device())
        if len(y):
            est.add_(squared_grad_sums(work, x, y, pcfg.fisher_kind, params, generator=generator), len(y))
    count = torch.tensor([float(est.count)], dtype=torch.float64)
    all_reduce_sum(count)
    for t in est.sums.values():
        all_reduce_sum(t)
    est.count = int(count.item())
    if est.count == 0:
        raise ValueError(f"no clean samples reached the Fisher estimate from {cfg.clean}")
    log(f"Fisher over {est.count} clean samples on {size} worker(s): Tr(Fbar) = {est.trace():.4g} "
        f"({time.perf_counter() - start:.1f}s)")
    before = evaluate_shards(suspect, cfg)
    if before:
        log("suspect model: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in before.items()))
    metrics = {"fisher_count": est.count, "fisher_trace": est.trace(), "skipped_samples": stream.stats.skipped,
               "fisher_seconds": time.perf_counter() - start, **{f"{k}_before": v for k, v in before.items()}}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            path = est.save(Path(tmp) / "fisher.safetensors")
            storage.write_bytes(cfg.fisher_url, path.read_bytes())
    _report(metrics, {"metrics.json": json.dumps(metrics).encode()})
    return metrics


# ---------------------------------------------------------------- stage 2: FIP fine-tuning
def _step_batches(cfg: StageConfig, pcfg: PurifyConfig, rank: int, size: int, first_step: int):
    """Endless (step, x, y) over this rank's clean shards, epoch after epoch, from `first_step` on."""
    if pcfg.batch_size % size:
        raise ValueError(f"global batch {pcfg.batch_size} is not divisible by {size} workers")
    local = pcfg.batch_size // size
    source: ShardSource = open_shards(cfg.clean)
    stream = RankStream(source, rank, size, shuffle=True, seed=pcfg.seed, skip_corrupt=cfg.skip_corrupt)
    per_epoch = max(1, len(stream) // local)
    step = first_step
    epoch, skip = divmod(first_step, per_epoch)
    while True:
        stream.set_epoch(epoch)
        for i, (x, y, _pad) in enumerate(rank_loader(stream, local, cfg.loader_workers)):
            if i >= per_epoch:
                break  # drop the short tail batch: every step has the full global batch
            if i < skip:
                continue
            if pcfg.augment:
                g = torch.Generator().manual_seed((pcfg.seed * 1_000_003 + step) * 131 + rank)
                x = augment_batch(x, g, pcfg.augment_pad, crop_prob_at(pcfg, step))
            yield step, x, y
            step += 1
        skip = 0
        epoch += 1


def _load_fbar(cfg: StageConfig, params: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Rank 0 reads Fbar and broadcasts it, so every rank regularises towards the same weights."""
    if rank == 0:
        fisher = FisherDiag.load(fetch(cfg.fisher_url, cfg.cache_dir))
        missing = set(params) - set(fisher.sums)
        if missing:
            raise ValueError(f"Fisher file {cfg.fisher_url} lacks {sorted(missing)[:3]}: estimated for another model?")
        fbar = {n: t.to(params[n].device) for n, t in fisher.mean().items() if n in params}
    else:
        fbar = {n: torch.zeros_like(p.detach()) for n, p in params.items()}
    for name in sorted(fbar):
        broadcast_(fbar[name])
    return fbar


def purify_stage(config: dict) -> dict:
    """FIP / Fast FIP with DDP over the Ray Train workers; resumes from the latest checkpoint."""
    cfg = StageConfig.from_dict(config)
    _setup(cfg)
    rank, size = world()
    pcfg = PurifyConfig(**cfg.purify)
    device = _device()
    suspect = load_model(fetch(cfg.model_url, cfg.cache_dir))
    work = prepare_model(suspect.model.to(device), pcfg)
    fbar = _load_fbar(cfg, trainable_params(work), rank)
    ddp = _wrap_ddp(work)
    purifier = Purifier(work, fbar, pcfg, logits_fn=ddp, rank=rank)
    history, evaluations = [], []
    resumed = _restore(purifier)
    if resumed is not None:
        history, evaluations = resumed
        log(f"resumed from checkpoint at step {purifier.step_count}")
    start = time.perf_counter()
    first_step = purifier.step_count
    for step, x, y in _step_batches(cfg, pcfg, rank, size, purifier.step_count):
        if step >= pcfg.iterations:
            break
        if cfg.fail_at_step is not None and step == cfg.fail_at_step and resumed is None and rank == size - 1:
            # a real crash comes long after the last checkpoint: give the controller's health check (every 2 s)
            # time to register it, then die without cleanup
            time.sleep(5)
            print(f"[fip] fault injection: rank {rank} exits at step {step}", flush=True)
            os._exit(1)
        record = purifier.step(x.to(device), y.to(device))
        history.append(record)
        done = purifier.step_count
        if done % cfg.log_every == 0 or done == pcfg.iterations:
            rate = (done - first_step) / max(time.perf_counter() - start, 1e-9)
            log(f"step {done}/{pcfg.iterations} ce {record['ce']:.4f} total {record['total']:.4f}"
                + (f" trace {record['trace']:.4g}" if "trace" in record else "") + f" ({rate:.2f} steps/s)")
        if cfg.eval_every and done % cfg.eval_every == 0 and done < pcfg.iterations:
            sync_buffers(work)
            snapshot = finalize_model(_copy_for_eval(work), pcfg)
            metrics = evaluate_shards(snapshot, cfg, limit=cfg.eval_samples)
            evaluations.append({"step": done, **metrics})
            log(f"eval at step {done}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in metrics.items()))
        if done % cfg.checkpoint_every == 0 and done < pcfg.iterations:
            _checkpoint(purifier, history, evaluations, {"step": done, **{k: v for k, v in record.items() if k != "step"}})
    sync_buffers(work)
    purified = finalize_model(work, pcfg)
    after = evaluate_shards(purified, cfg)
    if after:
        evaluations.append({"step": pcfg.iterations, **after})
        log("purified model: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in after.items()))
    metrics = {"step": purifier.step_count, "purify_seconds": time.perf_counter() - start,
               **{f"{k}_after": v for k, v in after.items()}}
    files = None
    if rank == 0:
        from fip.io import save_model

        with tempfile.TemporaryDirectory() as tmp:
            path = save_model(purified.cpu(), suspect.spec, Path(tmp) / "purified.safetensors",
                              {"source_sha256": suspect.sha256, "method": pcfg.method})
            files = {"purified.safetensors": path.read_bytes(), "purified.json": path.with_suffix(".json").read_bytes(),
                     "history.json": json.dumps({"history": history, "evaluations": evaluations}).encode(),
                     "metrics.json": json.dumps(metrics).encode()}
    _report(metrics, files)
    return metrics


def _wrap_ddp(model: nn.Module) -> nn.Module:
    """``ray.train.torch.prepare_model`` (DDP) inside Ray Train with several workers; else the model."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return model
    import ray.train.torch

    return ray.train.torch.prepare_model(model, move_to_device=False)


def _copy_for_eval(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _checkpoint(purifier: Purifier, history: list, evaluations: list, metrics: dict) -> None:
    files = None
    if world()[0] == 0:
        import io

        buf = io.BytesIO()
        torch.save(purifier.state_dict(), buf)
        files = {"state.pt": buf.getvalue(), "history.json": json.dumps({"history": history, "evaluations": evaluations}).encode()}
    _report(metrics, files)


def _restore(purifier: Purifier) -> tuple[list, list] | None:
    """Load the latest checkpoint into every rank's purifier (this run's own files: weights_only)."""
    if not _in_ray_train():
        return None
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        state_path = Path(d) / "state.pt"
        if not state_path.is_file():
            return None
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        logs = json.loads((Path(d) / "history.json").read_text())
    purifier.load_state_dict(state)
    return logs["history"], logs["evaluations"]
