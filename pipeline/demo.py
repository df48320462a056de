"""The main job on embedded defaults (`make demo`):

Fashion-MNIST -> D_val and test shards -> a BadNets model from the lab (cached) -> Fisher + FIP
through Ray Train with 2 workers -> evaluation -> MLflow run + registered model -> a short table and
one final line of JSON. The FIP settings are the ``demo`` preset (pipeline/presets/demo.yaml), which
says where they come from; the job itself is the same :func:`pipeline.driver.run_job` the CLI runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lab.attacks import AttackConfig
from lab.backdoor import LabConfig, make_backdoored_model
from lab.datasets import CleanSplit, load_dataset
from pipeline.config import load_job_config, merge
from pipeline.driver import run_job
from pipeline.shard_writer import write_shards
from pipeline.shardfmt import MANIFEST

DEMO_PRESET = "demo"


def _shards(data, dest: Path, indices, dataset: str, split: str, meta: dict | None = None) -> str:
    if (dest / MANIFEST).is_file():
        return str(dest)
    write_shards(data, str(dest), maxcount=1000, indices=indices, dataset=dataset, split=split, meta=meta, progress=True)
    return str(dest)


def run_demo(out: str | Path = "runs", overrides: dict | None = None, lab: LabConfig | None = None) -> dict:
    """The demo end to end; `overrides` are config sections on top of the ``demo`` preset."""
    out = Path(out)
    t0 = time.perf_counter()
    print("[demo] 1/4 backdoored model: BadNets on Fashion-MNIST (PreActResNet-18 x0.125; cached after the first run)")
    lab_cfg = lab or LabConfig(attack=AttackConfig("badnets"))
    art = make_backdoored_model(lab_cfg, out / "lab", progress=True)
    print(f"[demo]     suspect: ACC {100 * art.record['acc']:.2f}%  ASR {100 * art.record['asr']:.2f}%")

    print("[demo] 2/4 WebDataset shards: D_val (held out from the attacker) and the clean test set")
    split = CleanSplit.load(art.dval_path)
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test")
    clean = _shards(train.subset(split.indices), out / "shards" / f"fashion-mnist-dval-{split.digest}", split.indices,
                    "fashion-mnist", "train", {"dval_sha256_16": split.digest})
    test_dir = _shards(test, out / "shards" / "fashion-mnist-test", None, "fashion-mnist", "test")

    inputs = {"inputs": {"model": str(art.model_path), "clean": clean, "test": test_dir,
                         "attack_record": str(art.record_path)},
              "run": {"work_dir": str(out / "jobs")}}
    cfg = load_job_config(DEMO_PRESET, overrides=merge(inputs, overrides or {}))
    print(f"[demo] 3/4 Fisher + FIP through Ray Train with {cfg.resources.workers} workers, tracked in MLflow")
    result = run_job(cfg)
    m = result.metrics

    print("[demo] 4/4 results")
    rows = [("", "ACC %", "ASR %", "RA %"),
            ("suspect", f"{100 * m['acc_before']:.2f}", f"{100 * m['asr_before']:.2f}", f"{100 * m['ra_before']:.2f}"),
            (f"{cfg.purify.method} purified", f"{100 * m['acc_after']:.2f}", f"{100 * m['asr_after']:.2f}",
             f"{100 * m['ra_after']:.2f}")]
    for r in rows:
        print(f"  {r[0]:<14}{r[1]:>8}{r[2]:>8}{r[3]:>8}")
    seconds = time.perf_counter() - t0
    print(f"  purification {m.get('purify_seconds', 0):.1f}s, Fisher {m.get('fisher_seconds', 0):.1f}s, total {seconds:.1f}s; "
          f"MLflow run {result.run_id}")
    final = {"acc_before": m["acc_before"], "asr_before": m["asr_before"], "acc_after": m["acc_after"],
             "asr_after": m["asr_after"], "seconds": round(seconds, 1), "model_uri": result.model_uri}
    print(json.dumps(final))
    return final
