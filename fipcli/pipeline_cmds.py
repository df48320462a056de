"""`fip shard`, `fip purify`, `fip models ...` and `fip demo`: the pipeline's commands."""

from __future__ import annotations

import argparse
import json
import os
import sys

RATES = ("acc", "asr", "ra", "false_trigger")  # figures shown as percentages (a language model's perplexity is not one)


def _sections() -> dict[str, type]:
    from pipeline.config import SECTIONS

    return SECTIONS


def add_store_flags(p: argparse.ArgumentParser) -> None:
    from fipcli.config_flags import add_config_flags
    from pipeline.storage import StorageSettings

    add_config_flags(p, {"storage": StorageSettings})


def store_from_args(args):
    from pipeline.storage import Storage, StorageSettings

    return Storage(section_from_args(args, "storage", StorageSettings))


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """The job config's model section (--arch, --num-classes, ... --data-shape) on a command without a job."""
    from fipcli.config_flags import add_config_flags
    from pipeline.config import ModelSettings

    add_config_flags(p, {"model": ModelSettings})


def model_settings_from_args(args):
    from pipeline.config import ModelSettings

    return section_from_args(args, "model", ModelSettings)


def section_from_args(args, name: str, cls: type):
    """One config section from its flags alone (defaults for the rest), checked as a job's would be."""
    from fipcli.config_flags import config_overrides
    from pipeline.config import build

    return build(cls, config_overrides(args, {name: cls}).get(name, {}), name)


def register(sub) -> None:
    from fipcli.config_flags import add_config_flags
    from pipeline.config import preset_names

    p = sub.add_parser(
        "shard", help="write a data set (or its D_val) as WebDataset tar shards, or index shards made elsewhere",
        usage="fip shard SOURCE DEST [options]\n"
              "       fip shard text JSONL DEST --tokenizer FOLDER [--max-length N] [options]\n"
              "       fip shard index URL [URL ...] [--out URL] [options]",
        description="Write: stream SOURCE into shards at DEST (a folder or s3://bucket/prefix) with --workers "
                    "processes; an interrupted write resumes when rerun. Text: tokenise a JSON Lines file or "
                    "folder of {\"prompt\", \"response\"} records with a Hugging Face tokenizer folder "
                    "(tokenizer.json) into shards of token ids for a causal LM. Index: count and hash WebDataset "
                    "shards written by other tools (image under jpg/jpeg/png/webp, label under cls) so that "
                    "`fip purify --clean/--test` can split them exactly across workers.")
    p.add_argument("source", help="data set name (fashion-mnist, cifar10, imagenet-folder, gtsrb, digits), "
                                  "`text` or `index`")
    p.add_argument("dest", nargs="+", help="folder or s3://bucket/prefix; for `text`: the JSONL file or folder, "
                                           "then DEST; for `index`: shard URLs or brace patterns")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--root", default=None, help="data set folder")
    p.add_argument("--indices", default=None, help="a D_val index file: write only those samples")
    p.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing (or indexing) shards (default: the CPU count, at most 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the readers resize images of varying size to (default 224; images that all share "
                        "one size are read as they are)")
    p.add_argument("--dval-fraction", type=float, default=None,
                   help="write only D_val to DEST: this share of each class (text: of the records), chosen while "
                        "streaming")
    p.add_argument("--dval-seed", type=int, default=0, help="seed of the D_val choice")
    p.add_argument("--rest", default=None, help="with --dval-fraction: also write every other sample here")
    p.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier write at DEST")
    g = p.add_argument_group("fip shard text")
    g.add_argument("--tokenizer", default=None, metavar="FOLDER",
                   help="a Hugging Face tokenizer folder holding tokenizer.json (its eos and pad tokens from "
                        "tokenizer_config.json when named there); nothing is downloaded or unpickled")
    g.add_argument("--max-length", type=int, default=None,
                   help="tokens per sequence readers pad or cut to (default 512): a long prompt loses its start, a "
                        "record whose response does not fit is left out and listed in the manifest")
    g = p.add_argument_group("fip shard index")
    g.add_argument("--out", default=None,
                   help="where the index goes (default: <stem>.manifest.json beside the shards; for a read-only "
                        "bucket a local path or another prefix, then pass that file to --clean/--test)")
    g.add_argument("--channels", type=int, default=3, choices=[1, 3], help="channels the readers decode to")
    g.add_argument("--num-classes", type=int, default=None, help="default: the largest label + 1")
    g.add_argument("--classes", default=None, help="a text file with one class name a line (label order)")
    add_store_flags(p)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_shard)

    p = sub.add_parser(
        "purify", help="Fisher + FIP fine-tuning through Ray Train, tracked in MLflow",
        description="Settings are layered: built-in defaults < --preset < --config files (in order) < flags. "
                    "MLFLOW_TRACKING_URI, when set, is the tracking URI unless a layer sets one.",
    )
    p.add_argument("--preset", default=None, choices=preset_names(),
                   help="a shipped settings preset (pipeline/presets/*.yaml, each says where its numbers come from)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML with config sections (inputs, purify, resources, run, storage, tracking, analysis); repeatable")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    add_config_flags(p, _sections())
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_purify)

    tracking = argparse.ArgumentParser(add_help=False)
    tracking.add_argument("--tracking-uri", dest="tracking_uri_sub", default=argparse.SUPPRESS,
                          help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite runs/mlflow.db)")
    p = sub.add_parser("models", help="list, fetch and promote purified models in the MLflow registry",
                       parents=[tracking])
    msub = p.add_subparsers(dest="models_command", required=True)
    q = msub.add_parser("list", help="registered models, versions, aliases and tags", parents=[tracking])
    q.set_defaults(handler=run_models_list)
    q = msub.add_parser("get", help="download NAME[@ALIAS] (or NAME/VERSION) as safetensors, checking its SHA-256",
                        parents=[tracking])
    q.add_argument("ref")
    q.add_argument("-o", "--output", required=True)
    q.set_defaults(handler=run_models_get)
    q = msub.add_parser("promote", help="point ALIAS at NAME's VERSION", parents=[tracking])
    q.add_argument("name")
    q.add_argument("version")
    q.add_argument("alias")
    q.set_defaults(handler=run_models_promote)
    q = msub.add_parser("inspect", help="what a model file (.safetensors, .pth, .bin) or Hugging Face folder holds, "
                                        "as the pipeline understands it; nothing in it is unpickled or run")
    q.add_argument("file")
    add_model_flags(q)
    q.set_defaults(handler=run_models_inspect)
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("evaluate", help="ACC (and ASR/RA with an attack record) of a saved or registered model",
                       parents=[tracking])
    p.add_argument("--model", required=True, help="a .safetensors file, or models:/NAME@ALIAS (or NAME/VERSION)")
    p.add_argument("--test", required=True, help="test shards (folder, s3:// prefix or brace pattern) or a data set name "
                                                 "(its test split)")
    p.add_argument("--attack-record", default=None, help="attack record JSON (benchmark mode: adds ASR and RA)")
    p.add_argument("--root", default=None, help="data set folder, when --test names a data set")
    add_store_flags(p)
    add_model_flags(p)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_evaluate)

    p = sub.add_parser("demo", help="the main job on embedded defaults: lab BadNets model -> shards -> Ray FIP -> MLflow")
    p.add_argument("--out", default="runs", help="where data, models, shards and the MLflow store go")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--iterations", type=int, default=None)
    p.add_argument("--method", default=None, choices=["fip", "fast-fip"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(handler=run_demo)


def _shard_workers(args) -> int:
    if args.workers is None:
        return max(1, min(8, os.cpu_count() or 1))
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    return args.workers


def _text_source(args):
    """`fip shard text JSONL DEST`: the tokenised source, after refusing the flags that are for images."""
    from pipeline.text_source import DEFAULT_MAX_LENGTH, jsonl_source

    if len(args.dest) != 2:
        raise ValueError(f"fip shard text takes a JSONL file or folder and a destination, got {len(args.dest)} "
                         f"argument(s): {' '.join(args.dest)}")
    if args.tokenizer is None:
        raise ValueError("fip shard text needs --tokenizer FOLDER (a Hugging Face tokenizer folder with tokenizer.json)")
    for flag in ("root", "image_size", "indices"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is for image data sets, not fip shard text")
    max_length = DEFAULT_MAX_LENGTH if args.max_length is None else args.max_length
    return jsonl_source(args.dest[0], args.tokenizer, max_length, args.split), args.dest[1]


def run_shard(args) -> int:
    if args.source == "index":
        return run_shard_index(args)
    from lab.datasets import CleanSplit
    from pipeline.shard_sources import DvalSplit, dataset_source
    from pipeline.shard_writer import write_source, write_warnings

    if args.rest and args.dval_fraction is None:
        raise ValueError("--rest needs --dval-fraction (the rest is what D_val leaves)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    store = store_from_args(args)
    if args.source == "text":
        source, dest = _text_source(args)
    else:
        if args.tokenizer is not None or args.max_length is not None:
            raise ValueError("--tokenizer and --max-length are for fip shard text")
        if len(args.dest) != 1:
            raise ValueError(f"one destination expected, got {len(args.dest)}: {' '.join(args.dest)}")
        dest = args.dest[0]
        source = dataset_source(args.source, args.split, args.root, args.image_size)
    indices, meta = None, {}
    if args.indices:
        split = CleanSplit.load(args.indices)
        if split.dataset != args.source:
            raise ValueError(f"index file {args.indices} is for {split.dataset!r}, not {args.source!r}")
        if args.split != "train":
            raise ValueError(f"index file {args.indices} holds indices into the train split, not {args.split!r}")
        indices = split.indices
        meta = {"dval_sha256_16": split.digest, "dval_seed": split.seed}
    dval = DvalSplit(args.dval_fraction, args.dval_seed) if args.dval_fraction is not None else None
    result = write_source(source, dest, maxcount=args.maxcount, workers=_shard_workers(args), store=store, dval=dval,
                          rest=args.rest, indices=indices, limit=args.limit, meta=meta, progress=True,
                          overwrite=args.overwrite)
    if args.source == "text":  # the tokenizer travels with the shards (pipeline.text_source.store_tokenizer)
        from pipeline.text_source import store_tokenizer

        for url in result.manifests:
            store_tokenizer(args.tokenizer, url, store)
    s = result.stats
    for line in write_warnings(s, "unreadable source file(s)" if source.tokenizer is None else
                               f"record(s) whose response does not fit --max-length {source.max_length}"):
        print(f"warning: {line}", file=sys.stderr)
    print(json.dumps({**{url: {"count": m.count, "shards": len(m.shards)} for url, m in result.manifests.items()},
                      "shards_written": s.shards_written, "shards_reused": s.shards_reused,
                      "skipped": len(s.skipped), "samples_per_s": round(s.samples / max(s.seconds, 1e-9), 1)}))
    return 0


def run_shard_index(args) -> int:
    from pathlib import Path

    from pipeline.shard_index import index_shards

    classes = None
    if args.classes:
        classes = [line.strip() for line in Path(args.classes).read_text().splitlines() if line.strip()]
        if not classes:
            raise ValueError(f"class file {args.classes} names no classes")
    out, m = index_shards(args.dest, args.out, store=store_from_args(args), workers=_shard_workers(args),
                          image_size=args.image_size, channels=args.channels, classes=classes,
                          num_classes=args.num_classes, progress=True)
    print(json.dumps({"index": out, "count": m.count, "shards": len(m.shards), "classes": m.num_classes,
                      "image_shape": m.image_shape, "variable_size": m.variable_size}))
    return 0


def job_config_from_args(args):
    """The layered job config from --preset, --config files and flags (and MLFLOW_TRACKING_URI)."""
    from fipcli.config_flags import config_overrides
    from pipeline.config import load_job_config, merge

    overrides = config_overrides(args, _sections())
    cfg = load_job_config(args.preset, args.config, overrides)
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if cfg.tracking.tracking_uri is None and env_uri:
        cfg = cfg.replace(tracking=merge(vars(cfg.tracking), {"tracking_uri": env_uri}))
    return cfg


def run_purify(args) -> int:
    from pipeline.driver import run_job

    cfg = job_config_from_args(args)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = run_job(cfg)
    print(json.dumps({"run_id": result.run_id, "model_uri": result.model_uri, "purified": str(result.purified_path),
                      **{k: v for k, v in result.metrics.items() if isinstance(v, int | float | str)}}))
    return 0


def tracker_from_args(args, create: bool = False):
    """The MLflow store a `fip models` command reads: --tracking-uri, MLFLOW_TRACKING_URI, else ./runs/mlflow.db."""
    from pipeline.tracking import Tracker, default_tracking_uri

    uri = getattr(args, "tracking_uri_sub", None) or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri("runs/jobs")
    return Tracker(uri, create=create)


def run_models_list(args) -> int:
    tracker = tracker_from_args(args)
    rows = tracker.list_models()
    if not rows:
        print(f"no registered models in {tracker.uri}")
    for r in rows:
        tags = r["tags"]
        print(f"{r['name']}  v{r['version']}  aliases={','.join(r['aliases']) or '-'}  method={tags.get('method', '?')}  "
              f"ACC={tags.get('ACC', '?')}  ASR={tags.get('ASR', '?')}  source={tags.get('source_sha256', '?')[:12]}")
    return 0


def run_models_get(args) -> int:
    out = tracker_from_args(args).download_safetensors(args.ref, args.output)
    print(out)
    return 0


def run_models_promote(args) -> int:
    tracker_from_args(args).promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def run_models_inspect(args) -> int:
    from fip.io import describe_model_file
    from pipeline.suspect import requested_spec

    print(describe_model_file(args.file, requested_spec(model_settings_from_args(args))))
    return 0


def run_evaluate(args) -> int:
    """The job's own evaluation (pipeline.evaluation over shards, lab.metrics over a data set) of one model."""
    import tempfile
    from pathlib import Path

    from fip.tasks import task_named
    from lab.datasets import DATASETS, load_dataset
    from lab.metrics import evaluate_model
    from pipeline.evaluation import evaluate_shards
    from pipeline.plan import load_attack_record
    from pipeline.shards import open_shards
    from pipeline.suspect import load_suspect
    from pipeline.validation import check_inputs, check_model_fits

    store = store_from_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model.startswith("models:/"):
            path = tracker_from_args(args).download_safetensors(args.model, Path(tmp) / "model.safetensors")
        else:
            path = store.fetch(args.model, tmp)
        loaded = load_suspect(path, model_settings_from_args(args))
        model = loaded.model
        test = data = None
        if args.test in DATASETS:
            data = load_dataset(args.test, "test", args.root)
            check_model_fits(loaded, data.num_classes, data.shape, f"{args.test} test images", args.model)
        else:
            test = open_shards(args.test, store)
        record = load_attack_record(args.attack_record, store, tmp) if args.attack_record else None
        for warning in check_inputs(loaded, args.model, test=test, test_url=args.test,
                                    record=record.record if record else None, record_url=args.attack_record or ""):
            print(f"fip evaluate: {warning}", file=sys.stderr)
        attack = record.attack(store, tmp) if record else None
    if data is not None:
        metrics = evaluate_model(model, data.floats(), data.y, *((attack.trigger_floats, attack.target_of)
                                                                  if attack else (None, None)))
    else:
        metrics = evaluate_shards(model, test, attack, task=task_named(loaded.spec.task))
    print("  ".join(f"{k.upper()} {100 * v:.2f}%" if k in RATES else f"{k.upper()} {v:.4g}" for k, v in metrics.items()),
          file=sys.stderr)
    print(json.dumps({"model": args.model, "test": args.test, **metrics}))
    return 0


def run_demo(args) -> int:
    from pipeline.demo import run_demo as demo

    overrides: dict = {}
    for section, key, value in (("resources", "workers", args.workers), ("purify", "iterations", args.iterations),
                                ("purify", "method", args.method), ("purify", "seed", args.seed)):
        if value is not None:
            overrides.setdefault(section, {})[key] = value
    demo(args.out, overrides=overrides)
    return 0
