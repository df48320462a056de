"""`fip shard`, `fip purify`, `fip models ...` and `fip demo`: the pipeline's commands."""

from __future__ import annotations

import json
from dataclasses import fields


def register(sub) -> None:
    from fip.purify import PurifyConfig

    p = sub.add_parser("shard", help="write a data set (or its D_val) as WebDataset tar shards, locally or to s3://")
    p.add_argument("source", help="data set name: fashion-mnist, cifar10, imagenet-folder, gtsrb, digits")
    p.add_argument("dest", help="folder or s3://bucket/prefix")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--root", default=None, help="data set folder")
    p.add_argument("--indices", default=None, help="a D_val index file: write only those samples")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_shard)

    p = sub.add_parser("purify", help="Fisher + FIP fine-tuning through Ray Train, tracked in MLflow")
    p.add_argument("--model", required=True, help="suspect model (.safetensors; local or s3://)")
    p.add_argument("--clean", required=True, help="clean D_val shards: folder/prefix with manifest, or brace pattern")
    p.add_argument("--test", default=None, help="clean test shards for ACC (and ASR/RA with --attack-record)")
    p.add_argument("--attack-record", default=None, help="attack record JSON from `fip attack` (benchmark mode)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--threads-per-worker", type=int, default=1)
    p.add_argument("--address", default=None, help="Ray cluster address (default: local Ray, started if needed)")
    p.add_argument("--work-dir", default="runs/jobs", help="job outputs: folder or s3:// prefix")
    p.add_argument("--storage-path", default=None, help="Ray Train checkpoint storage (folder or s3://)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite runs/mlflow.db)")
    p.add_argument("--experiment", default="fip")
    p.add_argument("--register-as", default="fip-purified", help="registered model name ('' to skip)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--max-failures", type=int, default=2)
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable shards (counted) instead of failing")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL")
    p.add_argument("--config", default=None, help="YAML file with purify settings (flags override it)")
    add_purify_flags(p, PurifyConfig)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_purify)

    p = sub.add_parser("models", help="list, fetch and promote purified models in the MLflow registry")
    p.add_argument("--tracking-uri", default=None)
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="registered models, versions, aliases and tags")
    q.set_defaults(handler=run_models_list)
    q = msub.add_parser("get", help="download NAME[@ALIAS] (or NAME/VERSION) as safetensors")
    q.add_argument("ref")
    q.add_argument("-o", "--output", required=True)
    q.set_defaults(handler=run_models_get)
    q = msub.add_parser("promote", help="point ALIAS at NAME's VERSION")
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("alias")
    q.set_defaults(handler=run_models_promote)

    p = sub.add_parser("demo", help="the main job on embedded defaults: lab BadNets model -> shards -> Ray FIP -> MLflow")
    p.add_argument("--out", default="runs", help="where data, models, shards and the MLflow store go")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--method", default=None, choices=["fip", "fast-fip"])
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_demo)


def add_purify_flags(p, cls) -> None:
    """One flag per PurifyConfig field (the dataclass is the single source of truth)."""
    g = p.add_argument_group("FIP settings (PurifyConfig)")
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        # a None default says nothing of the type: read it from the annotation ("float | None")
        kind = type(f.default) if f.default is not None else (float if "float" in str(f.type) else int)
        if kind is bool:
            g.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes"), default=None, metavar="BOOL")
        else:
            g.add_argument(flag, type=kind, default=None, help=f"default {f.default}")


def purify_config_from_args(args, base: dict | None = None):
    from fip.purify import PurifyConfig

    values = dict(base or {})
    for f in fields(PurifyConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return PurifyConfig(**values)


def run_shard(args) -> int:
    import numpy as np

    from lab.datasets import CleanSplit, load_dataset
    from pipeline.shards import write_shards

    data = load_dataset(args.source, args.split, args.root)
    indices = np.arange(len(data))
    meta = {}
    if args.indices:
        split = CleanSplit.load(args.indices)
        if split.dataset != args.source:
            raise ValueError(f"index file {args.indices} is for {split.dataset!r}, not {args.source!r}")
        indices = np.asarray(split.indices)
        meta = {"dval_sha256_16": split.digest, "dval_seed": split.seed}
    if args.limit:
        indices = indices[: args.limit]
    subset = data.subset(indices)
    m = write_shards(subset, args.dest, args.maxcount, indices, args.source, args.split, meta, progress=True)
    print(json.dumps({"dest": args.dest, "count": m.count, "shards": len(m.shards)}))
    return 0


def run_purify(args) -> int:
    from pipeline.job import JobConfig, run_job

    base = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            base = yaml.safe_load(f) or {}
    cfg = JobConfig(
        model=args.model, clean=args.clean, test=args.test, attack_record=args.attack_record,
        purify=purify_config_from_args(args, base), workers=args.workers, cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker, threads_per_worker=args.threads_per_worker, address=args.address,
        work_dir=args.work_dir, storage_path=args.storage_path, tracking_uri=args.tracking_uri,
        experiment=args.experiment, register_as=args.register_as or None, checkpoint_every=args.checkpoint_every,
        max_failures=args.max_failures, skip_corrupt=args.skip_corrupt,
        s3_endpoint=args.s3_endpoint,
    )
    result = run_job(cfg)
    print(json.dumps({"run_id": result.run_id, "model_uri": result.model_uri, "purified": str(result.purified_path),
                      **{k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}}))
    return 0


def _tracking(args) -> None:
    from pipeline import tracking

    tracking.configure(args.tracking_uri)


def run_models_list(args) -> int:
    from pipeline import tracking

    _tracking(args)
    rows = tracking.list_models()
    if not rows:
        print("no registered models")
    for r in rows:
        tags = r["tags"]
        print(f"{r['name']}  v{r['version']}  aliases={','.join(r['aliases']) or '-'}  method={tags.get('method', '?')}  "
              f"ACC={tags.get('ACC', '?')}  ASR={tags.get('ASR', '?')}  source={tags.get('source_sha256', '?')[:12]}")
    return 0


def run_models_get(args) -> int:
    from pipeline import tracking

    _tracking(args)
    out = tracking.download_safetensors(args.ref, args.output)
    print(out)
    return 0


def run_models_promote(args) -> int:
    from pipeline import tracking

    _tracking(args)
    tracking.promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def run_demo(args) -> int:
    from pipeline.demo import run_demo as demo

    overrides = {k: v for k, v in {"iterations": args.iterations, "method": args.method}.items() if v is not None}
    demo(args.out, workers=args.workers, purify_overrides=overrides)
    return 0
