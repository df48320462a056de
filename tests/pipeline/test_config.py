from pipeline.config import Resources


def test_loader_processes_default_from_the_worker_cpus():
    """Unset, decoding gets the whole CPUs a worker reserves beyond its torch threads (capped at 8)."""
    assert Resources().loader_processes() == 0  # the lab's 1-CPU workers decode in the training process
    assert Resources(cpus_per_worker=8).loader_processes() == 7
    assert Resources(cpus_per_worker=2.5).loader_processes() == 1
    assert Resources(cpus_per_worker=32, threads_per_worker=2).loader_processes() == 8
    assert Resources(cpus_per_worker=8, loader_workers=0).loader_processes() == 0


def test_nccl_only_when_each_worker_owns_a_gpu():
    assert Resources().collective_backend() == "gloo"
    assert Resources(gpus_per_worker=0.5).collective_backend() == "gloo"  # NCCL refuses two ranks on one GPU
    assert Resources(gpus_per_worker=1).collective_backend() == "nccl"
