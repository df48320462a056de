"""The ready-made cluster definitions agree with what our jobs ask for: GPUs per worker, CPUs, the
entrypoint (a real `fip` command, parsed by fip's own parser), credentials only from a Secret."""

import shlex
from pathlib import Path

import pytest
import yaml

from cluster.submit import check_no_credentials
from fipcli.main import build_parser
from fipcli.pipeline_cmds import job_config_from_args

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
SECRET_WORDS = ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def _kind(docs, kind):
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _containers(cluster_spec: dict):
    yield "head", cluster_spec["headGroupSpec"], cluster_spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    for group in cluster_spec["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]["containers"][0]


def _cpus(text) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.fixture
def rayjob_config(tmp_path, monkeypatch):
    """The RayJob's entrypoint parsed by `fip`'s parser, its --config read from the ConfigMap: the
    JobConfig the job would run with."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    docs = _docs("kuberay/rayjob.yaml")
    job = _kind(docs, "RayJob")
    config_map = _kind(docs, "ConfigMap")
    mount = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "fip"
    local = {}
    for name, text in config_map["data"].items():
        local[f"{mount['mountPath']}/{name}"] = tmp_path / name
        (tmp_path / name).write_text(text)
    argv = [str(local.get(a, a)) for a in argv[1:]]
    assert any(a in map(str, local.values()) for a in argv), "the entrypoint reads the mounted job config"
    args = build_parser().parse_args(argv)
    assert args.command == "purify"
    return job, job_config_from_args(args)


def test_rayjob_entrypoint_is_a_fip_purify_that_joins_its_cluster(rayjob_config):
    job, cfg = rayjob_config
    assert cfg.resources.address == "auto"  # inside a Ray job: the cluster that runs it, not a new local Ray
    assert cfg.tracking.tracking_uri.startswith("http") and cfg.inputs.model.startswith("s3://")
    check_no_credentials((k, str(v)) for k, v in cfg.to_dict()["tracking"].items())
    assert cfg.purify.iterations == 2000  # the preset named on the command line applies


def test_gpu_workers_match_what_the_job_asks_for(rayjob_config):
    job, cfg = rayjob_config
    want_gpus, want_cpus = cfg.resources.gpus_per_worker, cfg.resources.cpus_per_worker
    assert want_gpus == 1
    specs = {"rayjob": job["spec"]["rayClusterSpec"], "raycluster": _kind(_docs("kuberay/raycluster.yaml"),
                                                                        "RayCluster")["spec"]}
    for where, spec in specs.items():
        head = spec["headGroupSpec"]["rayStartParams"]
        assert head.get("num-cpus") == "0", f"{where}: the head must not take Ray Train workers"
        gpus_total = 0
        for name, group, container in _containers(spec):
            if name == "head":
                continue
            limits = container["resources"]["limits"]
            assert float(limits["nvidia.com/gpu"]) == float(group["rayStartParams"]["num-gpus"]) == want_gpus, where
            assert _cpus(limits["cpu"]) >= want_cpus, f"{where}: a worker pod has fewer CPUs than a worker asks"
            assert container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
            gpus_total += group["maxReplicas"] * float(limits["nvidia.com/gpu"])
        assert gpus_total >= cfg.resources.workers * want_gpus, f"{where}: not enough GPU workers for the job"
    launcher = yaml.safe_load((CLUSTER / "launcher/aws-gpu.yaml").read_text())
    types = launcher["available_node_types"]
    assert types[launcher["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu_types and all(t["resources"]["GPU"] == want_gpus and t["resources"]["CPU"] >= want_cpus
                             for t in gpu_types)
    assert sum(t["max_workers"] for t in gpu_types) >= cfg.resources.workers


def test_same_image_and_ray_version_everywhere():
    import ray

    images = set()
    for name, kind, path in (("kuberay/raycluster.yaml", "RayCluster", ()), ("kuberay/rayjob.yaml", "RayJob",
                                                                          ("rayClusterSpec",))):
        spec = _kind(_docs(name), kind)["spec"]
        for key in path:
            spec = spec[key]
        assert spec["rayVersion"] == ray.__version__
        images |= {c["image"] for _, _, c in _containers(spec)}
    assert len(images) == 1
    assert f"rayproject/ray:{ray.__version__}" in (CLUSTER / "Dockerfile").read_text()


def test_credentials_come_only_from_a_secret():
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        for doc in _docs(name):
            if doc["kind"] == "ConfigMap":
                text = yaml.safe_dump(doc)
                assert not any(w.lower() in text.lower() for w in ("secret_access", "password")), name
                continue
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            for group, _, container in _containers(spec):
                env = {e["name"]: e for e in container["env"]}
                assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), f"{name} {group}"
                for var, e in env.items():
                    if any(w in var for w in SECRET_WORDS) or var.endswith("_KEY_ID"):
                        assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{name} {group} {var}"
    launcher = (CLUSTER / "launcher/aws-gpu.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in launcher and "IamInstanceProfile" in launcher


def test_submit_prints_the_job_yaml_the_rayjob_would_carry(tmp_path, capsys, monkeypatch):
    """`fip submit purify --print-config` on the RayJob's settings asks for the same GPUs."""
    from fipcli.main import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cm = _kind(_docs("kuberay/rayjob.yaml"), "ConfigMap")
    (tmp_path / "job.yaml").write_text(cm["data"]["job.yaml"])
    assert main(["submit", "purify", "--preset", "paper", "--config", str(tmp_path / "job.yaml"),
                 "--print-config"]) == 0
    sent = yaml.safe_load(capsys.readouterr().out)
    assert sent["resources"]["gpus_per_worker"] == 1 and sent["resources"]["address"] == "auto"
