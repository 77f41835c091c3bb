"""Cluster choice and GPU placement (wsi_ssl.tiling._cluster) with real dask clusters."""

from __future__ import annotations

import os

import pytest

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.tiling._cluster import (
    ClusterPlan,
    plan_cluster,
    start_cluster,
    submit_options,
    visible_gpus,
    worker_device,
)
from wsi_ssl.tiling._embed import _Writer
from wsi_ssl.tiling._jobguard import JobReaper, gpu_for_worker
from wsi_ssl.tiling._jobqueue import check_inputs_on_cluster

# xdist: starts dask workers with the job reaper, which tests/cluster/test_slurm.py's leftover
# checks would see
pytestmark = pytest.mark.xdist_group("machine-processes")


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


# --------------------------------------------------------------------------- batch-cluster pieces


def test_gpu_for_worker_uses_the_one_node_rule_on_the_jobs_allocation():
    alloc = {"CUDA_VISIBLE_DEVICES": "3,5"}  # what Slurm gave the job
    assert gpu_for_worker("SLURMCluster-7-0", 2, alloc) == "3"
    assert gpu_for_worker("SLURMCluster-7-1", 2, alloc) == "5"
    assert gpu_for_worker("SLURMCluster-7", 1, {"CUDA_VISIBLE_DEVICES": "6"}) == "6"
    assert gpu_for_worker("SLURMCluster-7-1", 2, {}) == "1"  # no allocation variable: 0..G-1
    assert gpu_for_worker("SLURMCluster-7", 0, alloc) is None  # CPU jobs are left alone


def test_nanny_preload_pins_each_worker_of_a_job_to_its_own_gpu(tmp_path):
    # a real `dask worker --nworkers 2` as a batch job starts it, with the job's allocation
    import subprocess
    import sys

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=0, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="4,6", WSI_SSL_GPUS_PER_JOB="2")
        proc = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--name", "SLURMCluster-3", "--nworkers", "2", "--nthreads", "1", "--resources",
             "GPU=1", "--preload-nanny", "wsi_ssl.tiling._jobguard", "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            client.wait_for_workers(2, timeout=120)

            def probe(dask_worker):  # defined here: travels by value to the outside workers
                import os

                return dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")

            seen = client.run(probe)
            assert sorted(seen.values()) == [("SLURMCluster-3-0", "4"), ("SLURMCluster-3-1", "6")]
            assert submit_options(client) == {"resources": {"GPU": 1}}
        finally:
            proc.terminate()
            proc.wait(60)


def test_reaper_cancels_what_is_left_when_the_driver_goes(tmp_path):
    import stat
    import sys

    log = tmp_path / "cancelled.txt"
    cancel = tmp_path / "fake-scancel"  # records its arguments (the real scancel: tests/cluster)
    cancel.write_text(f"#!{sys.executable}\nimport sys\nopen({str(log)!r}, 'a').write("
                      "' '.join(sys.argv[1:]) + '\\n')\n")
    cancel.chmod(cancel.stat().st_mode | stat.S_IEXEC)
    r = JobReaper(str(cancel))
    for j in ("11", "12", "13"):
        r.add(j)
    r.remove("12")  # cancelled by the driver itself
    r.close(cancel=True)  # as when the driver dies: the pipe closes without "exit"
    assert log.read_text().split() == ["11", "13"]
    log.unlink()
    r = JobReaper(str(cancel))
    r.add("21")
    r.close()  # a clean exit: nothing to cancel
    assert not log.exists()


def test_writer_queue_is_bounded_and_a_failed_write_stops_the_run():
    import threading

    gate = threading.Event()
    written = []

    def slow(i):
        gate.wait(30)
        written.append(i)

    w = _Writer(maxsize=2)
    for i in range(3):  # one being written + two queued
        w.submit(slow, i)
    blocked = threading.Thread(target=w.submit, args=(slow, 3))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # backpressure: the fourth waits for room
    gate.set()
    blocked.join(30)
    w.close()
    assert written == [0, 1, 2, 3]

    def boom():
        raise OSError("disk full")

    w = _Writer(maxsize=1)
    w.submit(boom)
    with pytest.raises(OSError, match="disk full"):
        w.close()


def test_workers_that_cannot_see_the_inputs_stop_the_run_in_one_line(tmp_path):
    from distributed import Client, LocalCluster

    seen = tmp_path / "a.svs"
    seen.write_bytes(b"x")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        check_inputs_on_cluster(client, [str(seen)], str(tmp_path))  # all visible: no error
        with pytest.raises(InputError, match=r"cannot see 1 of the 2 input files checked \(e.g. "
                           r"'/nowhere/w.safetensors' is missing on host"):
            check_inputs_on_cluster(client, [str(seen)], None, ["/nowhere/w.safetensors"])
