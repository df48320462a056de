"""benchmarks/gpu_check.sh cannot run here (no GPU): its shell is syntax-checked and every Python part
runs on the CPU at toy sizes, through the same code path the GPU run takes."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
TOY = {"size": 32, "width": 0.0625}


def test_script_parses_and_names_its_parts():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    for part in ("mfu", "fisher", "loader", "ray"):
        assert f" {part} --batch" in text, part


def test_published_peaks():
    assert gpu_check.card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.card_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.card_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.card_peak_tflops("Some Other Card") is None


def test_mfu_and_fisher_parts_on_cpu(tmp_path, one_thread):
    out = tmp_path / "r.jsonl"
    r = gpu_check.main(["--part", "mfu", "--device", "cpu", "--batch", "2", "--steps", "1", "--size", "32",
                        "--width", "0.0625", "--matmul-n", "128", "--out", str(out)])
    for m in ("fip", "fast-fip"):
        row = r[m]
        assert row["trace_flops"] > row["plain_flops"] > 0 and row["avg_s"] > 0 and 0 < row["mfu_matmul"]
    assert r["fast-fip"]["prepare_s"] > 0 and json.loads(out.read_text())["part"] == "mfu"
    f = gpu_check.fisher_rate("cpu", batch=2, chunk=2, steps=1, **TOY)
    assert f["empirical_finite"] and f["true_finite"] and f["true_samples_per_s"] > 0


def test_loader_part_on_cpu(tmp_path, one_thread):
    from pipeline.shards import open_shards

    shards = gpu_check.make_shards(tmp_path, images=24, classes=4, size=48, workers=1)
    assert open_shards(str(shards)).total == 24
    r = gpu_check.loader_vs_gpu(shards, "cpu", workers=(0, 2), batch=4, steps=2, **TOY)
    assert [row["workers"] for row in r["loader"]] == [0, 2] and all(row["samples_per_s"] > 0 for row in r["loader"])
    assert r["gpu_consumes_samples_per_s"] > 0 and r["fed_samples_per_s"] > 0 and r["bound"] in ("data", "compute")


def test_asking_for_cuda_without_it_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit):
        gpu_check.main(["--part", "mfu"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # starts Ray Train twice: about a minute on 2 cores
def test_ray_part_on_cpu(ray_session):
    r = gpu_check.ray_sharing((1, 2), use_gpu=False, batch=4, steps=1, **TOY)
    assert [run["workers"] for run in r["runs"]] == [1, 2]
    assert all(run.get("backend") == "gloo" and run["samples_per_s"] > 0 for run in r["runs"]), r
