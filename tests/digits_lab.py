"""The tests' tiny suspect: a BadNets-backdoored BN-free ViT on scikit-learn digits, committed as files.

Training is not bit-identical across CPUs (the kernels' instruction set changes the last digits), so a
suspect trained inside a fixture differs from machine to machine, and so would every figure a test
pins. The committed files make the suspect the same everywhere; only floating-point reduction order
is left to differ. Re-make them (only when the lab's recipe changes on purpose) with
``python tests/digits_lab.py``, then re-record tests/e2e/pinned/tiny_job.json.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

FOLDER = Path(__file__).parent / "data" / "digits-lab"


def lab_config():
    from lab.attacks import AttackConfig
    from lab.backdoor import LabConfig
    from lab.train import TrainConfig

    return LabConfig(attack=AttackConfig("badnets", params={"size": 2}), dataset="digits", arch="vit-small",
                     width=0.25, train=TrainConfig(epochs=25, batch_size=64, lr=0.05), clean_fraction=0.1)


def copy_to(dest: Path):
    """The committed suspect, copied to `dest` with its record's paths pointing there (as the lab writes them)."""
    from lab.backdoor import BackdoorArtifacts

    dest.mkdir(parents=True, exist_ok=True)
    for f in FOLDER.iterdir():
        shutil.copyfile(f, dest / f.name)
    record_path = next(dest.glob("*.record.json"))
    record = json.loads(record_path.read_text())
    record.update(model_path=str(dest / Path(record["model_path"]).name),
                  dval_path=str(dest / Path(record["dval_path"]).name))
    record_path.write_text(json.dumps(record, indent=2))
    return BackdoorArtifacts(Path(record["model_path"]), record_path, Path(record["dval_path"]), record, True,
                             record["config_hash"])


def remake() -> None:
    from lab.backdoor import make_backdoored_model

    shutil.rmtree(FOLDER, ignore_errors=True)
    made = make_backdoored_model(lab_config(), FOLDER, progress=True, reuse=False)
    print(json.dumps({k: made.record[k] for k in ("acc", "asr", "ra", "config_hash")}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    remake()
