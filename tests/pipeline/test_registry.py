"""The registry's aliases mean what docs/registry.md says, and reading commands never create a store."""

import pytest

from fip.io import save_model
from fip.models import ModelSpec, build_model
from fipcli.main import main
from pipeline.tracking import Tracker, TrackingError

SPEC = ModelSpec("vit-small", num_classes=10, in_channels=1, image_size=8, width=0.25)


@pytest.fixture
def store(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts")
    model = build_model(SPEC).eval()
    path = save_model(model, SPEC, tmp_path / "m.safetensors")

    def version(tags: dict) -> str:
        run = tracker.start_run("fip", "r", {}, {})
        reg = tracker.register(run, model, path, (1, 8, 8), "purified", tags)
        tracker.offer_candidate("purified", reg.version, tags)
        return reg.version

    return tracker, version


def aliases(tracker: Tracker) -> dict[str, list[str]]:
    return {str(r["version"]): r["aliases"] for r in tracker.list_models()}


def test_candidate_moves_only_to_a_better_version_of_the_same_source(store):
    tracker, version = store
    assert version({"source_sha256": "a", "DER": "0.90"}) == "1"
    assert aliases(tracker) == {"1": ["candidate"]}
    version({"source_sha256": "a", "DER": "0.70"})  # worse: candidate stays (NAME/latest is version 2)
    assert aliases(tracker) == {"1": ["candidate"], "2": []}
    assert str(tracker.resolve_version("models:/purified/latest").version) == "2"
    version({"source_sha256": "a"})  # no score to compare: candidate stays
    assert aliases(tracker)["1"] == ["candidate"]
    version({"source_sha256": "a", "DER": "0.95"})  # better
    assert aliases(tracker) == {"1": [], "2": [], "3": [], "4": ["candidate"]}
    tracker.promote("purified", "4", "production")
    version({"source_sha256": "b", "DER": "0.10"})  # another suspect: its own candidate, production untouched
    assert aliases(tracker)["5"] == ["candidate"] and aliases(tracker)["4"] == ["production"]


def test_a_sweep_objective_is_compared_before_der(store):
    tracker, version = store
    version({"source_sha256": "a", "objective": "0.5", "DER": "0.99"})
    version({"source_sha256": "a", "objective": "0.6", "DER": "0.50"})
    assert aliases(tracker)["2"] == ["candidate"]


def test_reading_commands_do_not_create_a_store(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["models", "list"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(TrackingError, match="no MLflow store"):
        Tracker(f"sqlite:///{tmp_path / 'nope.db'}", create=False)


def test_tampered_artifact_is_refused(store, tmp_path):
    tracker, version = store
    version({"source_sha256": "a"})
    mv = tracker.resolve_version("purified/latest")
    stored = next((tmp_path / "artifacts").rglob("purified/m.safetensors"))
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF
    stored.write_bytes(bytes(data))
    with pytest.raises(TrackingError, match="does not match the SHA-256 recorded at registration"):
        tracker.download_safetensors(f"purified/{mv.version}", tmp_path / "got.safetensors")


def test_metric_tags_one_spelling_for_jobs_and_sweeps():
    """A job's metrics and a sweep's trial row end in the same ACC/ASR/RA/DER tags; DER follows the
    definition (ASR removed minus ACC lost, halved, plus a half) computed here by hand."""
    from pipeline.artifacts import Measured
    from pipeline.registry import metric_tags

    job = Measured(before={"acc": 0.92, "asr": 1.0}, after={"acc": 0.89, "asr": 0.04, "ra": 0.85})
    tags = metric_tags(job)
    assert tags == {"ACC": "0.8900", "ASR": "0.0400", "RA": "0.8500", "DER": f"{(1 + 0.96 - 0.03) / 2:.4f}"}
    assert metric_tags(Measured(after={"acc": 0.5, "asr": None, "ra": None})) == {"ACC": "0.5000"}
    assert metric_tags(Measured()) == {}
    # the names users read in MLflow are made from the structure in one place
    assert job.flat() == {"acc_before": 0.92, "asr_before": 1.0, "acc_after": 0.89, "asr_after": 0.04, "ra_after": 0.85}
