"""Cluster choice and GPU placement (wsi_ssl.tiling._cluster) with real dask clusters."""

from __future__ import annotations

import os

import pytest

from wsi_ssl.errors import ConfigError
from wsi_ssl.tiling._cluster import (
    ClusterPlan,
    plan_cluster,
    start_cluster,
    submit_options,
    visible_gpus,
    worker_device,
)


def test_one_slide_or_one_worker_runs_in_process():
    p = plan_cluster(1, n_gpus=0, cores=16)
    assert p.kind == "sync" and "one slide" in p.reason
    p = plan_cluster(5, n_gpus=0, cores=4)  # 4 cores: one CPU worker of 4 threads
    assert p.kind == "sync" and "one worker" in p.reason
    p = plan_cluster(5, n_gpus=1, cores=16)
    assert p.kind == "sync" and "one GPU" in p.reason and p.torch_threads is None
    p = plan_cluster(5, n_gpus=0, cores=16, n_workers=1)
    assert p.kind == "sync" and "n_workers=1" in p.reason
    assert plan_cluster(5, client="sync").kind == "sync"


def test_cpu_and_gpu_plans():
    p = plan_cluster(10, n_gpus=0, cores=16)
    assert (p.kind, p.n_workers, p.torch_threads, p.gpus) == ("local", 4, 4, ())
    assert "4 CPU workers" in p.reason
    p = plan_cluster(3, n_gpus=0, cores=16)  # never more workers than slides
    assert (p.kind, p.n_workers) == ("local", 3)
    p = plan_cluster(10, n_gpus=4, cores=32)
    assert (p.kind, p.n_workers, p.torch_threads) == ("local-gpu", 4, 6)
    assert p.gpus == ("0", "1", "2", "3") and "CUDA_VISIBLE_DEVICES=0,1,2,3" in p.reason
    p = plan_cluster(2, n_gpus=4, cores=32)  # 2 slides: 2 GPU workers
    assert p.gpus == ("0", "1")
    p = plan_cluster(10, client="tcp://127.0.0.1:8786")
    assert p.kind == "existing" and "tcp://127.0.0.1:8786" in p.reason


def test_visible_gpus_follow_the_parents_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_gpus(2) == ("5", "7")
    assert plan_cluster(4, n_gpus=2, cores=8).gpus == ("5", "7")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus(3) == ("0", "1", "2")
    assert visible_gpus(0) == ()


def test_bad_values_name_the_parameter():
    with pytest.raises(ConfigError, match="n_workers=0"):
        plan_cluster(3, n_workers=0)
    with pytest.raises(ConfigError, match="n_gpus=-1"):
        plan_cluster(3, n_gpus=-1)
    with pytest.raises(ConfigError, match="one GPU per worker"):
        ClusterPlan(kind="local-gpu", n_workers=2, torch_threads=1, gpus=("0",))
    with pytest.raises(ConfigError, match="'sync'"):
        start_cluster(plan_cluster(1, n_gpus=0))


def _env_and_name(dask_worker=None):
    if dask_worker is None:  # inside a task
        from distributed import get_worker

        dask_worker = get_worker()
    return dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_two_fake_gpus_get_one_pinned_worker_each(monkeypatch):
    # no GPU here: a fake count of 2 starts the real per-GPU cluster (dask-cuda is not installed,
    # and use_dask_cuda=False forces the built-in one anyway)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    plan = plan_cluster(4, n_gpus=2, cores=8)
    client, cluster = start_cluster(plan, use_dask_cuda=False)
    try:
        client.wait_for_workers(2, timeout=60)
        seen = client.run(_env_and_name)  # every worker, by address
        assert sorted(v[1] for v in seen.values()) == ["0", "1"]
        assert {v[0]: v[1] for v in seen.values()} == {"gpu-0": "0", "gpu-1": "1"}
        opts = submit_options(client)
        assert opts == {"resources": {"GPU": 1}}
        # tasks asking for one GPU each run on both workers, never two at once on one
        futs = [client.submit(_env_and_name, pure=False, **opts) for _ in range(6)]
        assert {f.result()[1] for f in futs} <= {"0", "1"}
        assert os.environ.get("CUDA_VISIBLE_DEVICES") is None  # the driver is left alone
    finally:
        client.close()
        cluster.close()


def test_plain_cluster_has_no_gpu_resource():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert submit_options(client) == {}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, resources={"GPU": 1},
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert submit_options(client) == {"resources": {"GPU": 1}}


def test_worker_device_without_gpu():
    import torch

    if torch.cuda.is_available():  # this machine has a GPU: the pinned-worker case
        assert worker_device("auto").startswith("cuda:")
    else:
        assert worker_device("auto") == "cpu"
    assert worker_device("cuda:3") == "cuda:3" and worker_device("cpu") == "cpu"
