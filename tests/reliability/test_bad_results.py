"""Purifications that wrecked the model (issue 22, class 1) never take an alias: a run whose training loss
diverged, whose weights left the finite range, whose D_val cross-entropy rose by more than ln(K) or whose
D_val accuracy collapsed is refused in one line (:mod:`pipeline.acceptance`), with the verdict in its MLflow
tags, and nothing is registered. Before, `fip purify --lr 1e9` ended with cross-entropy 2.4e16, ACC 11.1 %,
exit 0 and the model registered as @candidate.

The sweep cases call the sweep's own winner registration (:func:`tuning.sweep._register_winner`) with a
wrecked winner, in-process against a real SQLite MLflow store, after a healthy winner took @candidate: it
must stay where it is. The job case runs `fip purify` in this process on the session's Ray, the sweep case
`fip tune` in its own process (Ray; ~1 minute)."""

import json
from pathlib import Path

import pytest
import torch
from reliability.harness import judge_error, run_call, run_main, run_process
from reliability.tiny_job import TINY, mlflow_state, quiet_env, tiny_inputs, tracking_uri  # noqa: F401
from torch import nn

from fip.io import load_model, save_model


def _head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.fixture(scope="module")
def suspect(tiny_inputs, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny ViT fitted to the 140 D_val digits (a suspect must classify its clean set well for a
    collapse to show): ~100 full-batch Adam steps, a few seconds."""
    from pipeline.shards import open_shards, read_all

    torch.manual_seed(0)
    loaded = load_model(tiny_inputs.model)
    x, y, _ = read_all(open_shards(tiny_inputs.clean))
    x = x.float() / 255.0
    model = loaded.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = tmp_path_factory.mktemp("suspect") / "fitted.safetensors"
    return save_model(model.eval(), loaded.spec, path)


def _wrecked(suspect: Path, case: str, out: Path) -> Path:
    """The suspect, wrecked the way `case` says, as the file a trial leaves (purified.safetensors + history)."""
    loaded = load_model(suspect)
    model, history = loaded.model, [{"step": 1, "ce": 0.5, "total": 0.6}]
    with torch.no_grad():
        if case == "NaN weights":
            next(model.parameters()).view(-1)[0] = float("nan")
        elif case == "cross-entropy diverged":  # logits turned round and 100 times larger: CE in the hundreds
            _head(model).weight.mul_(-100)
            _head(model).bias.mul_(-100)
        elif case == "D_val accuracy collapsed":  # uniform logits: CE ln(10), one class for every image
            _head(model).weight.zero_()
            _head(model).bias.zero_()
        elif case == "training loss NaN":
            history.append({"step": 2, "ce": float("nan"), "total": float("nan")})
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps({"history": history, "evaluations": []}))
    return save_model(model, loaded.spec, out / "purified.safetensors", {"source_sha256": loaded.sha256})


class Sweep:
    """A sweep's parent run and the registration of its winners, in a real SQLite store."""

    def __init__(self, suspect: Path, clean: str, tmp: Path) -> None:
        from pipeline.config import JobConfig
        from pipeline.tracking import Tracker

        self.tmp = tmp
        self.base = JobConfig.from_dict({"inputs": {"model": str(suspect), "clean": clean},
                                         "run": {"work_dir": str(tmp / "jobs")},
                                         "tracking": {"tracking_uri": tracking_uri(tmp)}})
        self.tracker = Tracker(tracking_uri(tmp), tmp / "mlartifacts")
        self.parent = self.tracker.start_run("fip", "sweep-r3", {}, {"kind": "sweep"})

    def register(self, purified: Path, uap_max: float | None = None):
        from tuning.evidence import Evidence
        from tuning.sweep import SweepConfig, _register_winner

        child = self.tracker.start_run("fip", f"trial-{purified.parent.name}", {}, {}, self.parent)
        winner = {"trial_id": purified.parent.name, "objective": 0.5, "purified": str(purified),
                  "child_run_id": child}
        evidence = Evidence(0.9, 180, 0.91, uap_max, 3 if uap_max is not None else None, 0.8, 3)
        return _register_winner(self.tracker, self.base, SweepConfig(name="r3"), winner, self.parent, lambda m: None,
                                evidence)

    def candidate(self) -> str | None:
        rows = [r for r in self.tracker.list_models() if "candidate" in r["aliases"]]
        return str(rows[0]["version"]) if rows else None


@pytest.fixture(scope="module")
def sweep(suspect, tiny_inputs, tmp_path_factory) -> Sweep:  # noqa: F811
    """A sweep whose first, healthy winner (the suspect itself: nothing wrecked) took @candidate."""
    tmp = tmp_path_factory.mktemp("sweep")
    s = Sweep(suspect, tiny_inputs.clean, tmp)
    assert s.register(_wrecked(suspect, "healthy", tmp / "healthy")) == "models:/fip-purified@candidate"
    return s


CASES = {"NaN weights": ("finite range",), "cross-entropy diverged": ("cross-entropy", "diverged", "ln(10)"),
         "D_val accuracy collapsed": ("accuracy", "D_val", "collapsed", "max_dval_acc_drop"),
         "training loss NaN": ("training loss diverged", "step 2")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_sweep_winner_that_wrecked_the_model(case, sweep, suspect, verdict):
    obs = run_call(lambda: sweep.register(_wrecked(suspect, case, sweep.tmp / case.replace(" ", "-"))))
    judged = judge_error(obs, ("rejected", "not registered", *CASES[case]))
    versions = [str(r["version"]) for r in sweep.tracker.list_models()]
    if judged[0] == "clean error" and (versions != ["1"] or sweep.candidate() != "1"):
        judged = ("silent wrong", f"versions {versions}, @candidate on {sweep.candidate()}")
    tags = sweep.tracker.client.get_run(sweep.parent).data.tags
    if judged[0] == "clean error" and tags.get("acceptance") != "rejected":
        judged = ("silent wrong", f"the sweep's run is tagged acceptance={tags.get('acceptance')!r}")
    verdict("bad input", "clean error", judged, obs.seconds, case=f"fip tune winner: {case}")


@pytest.mark.slow
def test_purify_with_a_learning_rate_that_wrecks_the_model(ray_session, suspect, tiny_inputs, tmp_path,  # noqa: F811
                                                           verdict):
    """`fip purify --lr 1e3` on the fitted tiny suspect: the job runs to its end, then is refused; its run is
    FAILED with the verdict in its tags, and no version is registered. In this process, on the session's Ray
    (the refusal is the driver's, after the stages: a process and a Ray of its own would add only start-up)."""
    from mlflow import MlflowClient

    argv = ["purify", "--model", str(suspect), "--clean", tiny_inputs.clean, "--test", tiny_inputs.test,
            "--work-dir", str(tmp_path / "jobs"), "--tracking-uri", tracking_uri(tmp_path), *TINY, "--lr", "1e3"]
    obs = run_main(argv)
    judged = judge_error(obs, "purified model rejected, not registered")
    state = mlflow_state(tmp_path)
    client = MlflowClient(tracking_uri(tmp_path))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    if judged[0] == "clean error" and (state.versions or state.runs != ["FAILED"]
                                       or runs[0].data.tags.get("acceptance") != "rejected"):
        judged = ("silent wrong", f"runs {state.runs}, versions {state.versions}, tags {runs[0].data.tags}")
    verdict("bad input", "clean error", judged, obs.seconds, case="fip purify --lr 1e3 (the model is wrecked)")


@pytest.mark.slow
def test_tune_whose_only_trial_wrecks_the_model(suspect, tiny_inputs, tmp_path, verdict):  # noqa: F811
    """`fip tune` with one trial at lr 1e3 (the model given by a relative path, as a user types it): the trial
    is refused by the same check, so no trial finishes; the sweep fails in one line naming the trial's verdict
    (the trial ends REJECTED, not in an error with Ray Tune's traceback), and nothing is registered."""
    argv = ["tune", "--model", suspect.name, "--clean", tiny_inputs.clean, "--work-dir", str(tmp_path / "jobs"),
            "--tracking-uri", tracking_uri(tmp_path), *TINY, "--cpus-per-worker", "0.5", "--num-samples", "1",
            "--scheduler", "none", "--searcher", "random", "--space", "lr=1000", "--space", "iterations=8",
            "--report-every", "4", "--name", "wreck"]
    obs = run_process(argv, suspect.parent, timeout=500, env=quiet_env())
    judged = judge_error(obs, ("none of its 1 trials finished", "1 rejected", "purified model rejected, not registered"))
    state = mlflow_state(tmp_path)
    if judged[0] == "clean error" and state.versions:
        judged = ("silent wrong", f"versions registered: {state.versions}")
    verdict("bad input", "clean error", judged, obs.seconds, case="fip tune: the only trial wrecks the model")


def test_a_sweep_winner_the_probe_flags_gets_a_version_but_not_candidate(sweep, suspect):
    """A healthy winner whose probe still reaches one class with 60 % of the held-out images: registered (a
    version with its evidence tags, so the defender can look) but @candidate stays where it was."""
    before = sweep.candidate()
    uri = sweep.register(_wrecked(suspect, "healthy", sweep.tmp / "flagged"), uap_max=0.6)
    version = uri.rsplit("/", 1)[1]
    assert uri == f"models:/fip-purified/{version}" and sweep.candidate() == before
    tags = sweep.tracker.client.get_model_version("fip-purified", version).tags
    assert tags["evidence.flagged"] == "true" and tags["evidence.uap_max"] == "0.6000"
    assert tags["evidence.verdict"].startswith("flagged: one small shared perturbation sends 60 % of the held-out "
                                               "images to class 3 (the suspect: 80 % to class 3)")
