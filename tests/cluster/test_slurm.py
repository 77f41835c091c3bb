"""`wsi-ssl embed --cluster slurm` and `wsi-ssl cluster-check` on a real single-node Slurm
cluster started by the tests (conftest.py): the store equals the in-process run's, array for
array, and no job outlives the command, whether it ends normally, by SIGINT, SIGTERM or SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests._helpers import poll_until, wait_until
from tests.cluster.cluster_helpers import (
    EMBED_KW,
    SLURM_ARGS,
    assert_same_arrays,
    embed_cmd,
    make_cohort,
    processes_matching,
    run,
)
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import embed_slides

# xdist: with the tests that start dask workers / job reapers (the leftover checks below look at
# every process on the machine)
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("machine-processes")]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    return make_cohort(tmp_path_factory.mktemp("slurm-cohort"), 4)


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    rep = embed_slides(cohort, "tiny-cnn", path, client="sync", **EMBED_KW)
    assert rep.ok and len(rep.done) == len(cohort)
    return path


def test_cli_embed_on_slurm_equals_the_in_process_run(slurm, cohort, reference, tmp_path):
    store = tmp_path / "slurm.zarr"
    logs = tmp_path / "logs"
    out = run(embed_cmd(cohort, store, *SLURM_ARGS, "--jobs", "2", "--log-directory", str(logs)))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ran       slurm through dask-jobqueue: 2 jobs x 1 CPU worker" in out.stdout
    assert f"embedded  {len(cohort)} slides" in out.stdout
    assert "submitted job" in out.stderr  # the jobs are logged as they are submitted
    assert_same_arrays(store, reference)
    assert TileStore(store, mode="r").verify().ok
    assert slurm.wait_no_jobs() == []  # the allocation ended with the run
    outs = sorted(logs.glob("*.err"))
    assert len(outs) >= 2, outs  # two real jobs ran (Slurm wrote their logs)
    # a rerun skips everything and submits nothing
    again = run(embed_cmd(cohort, store, *SLURM_ARGS, "--jobs", "2"))
    assert again.returncode == 0 and f"skipped   {len(cohort)} slides" in again.stdout
    assert "submitted job" not in again.stderr


def _wait_running(slurm, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll squeue (Slurm runs the jobs in other processes) until ``n`` jobs run."""

    def running() -> bool:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        return sum(st == "RUNNING" for _, _, st in slurm.jobs()) >= n

    wait_until(running, timeout, lambda: f"{n} running jobs: {slurm.jobs()}", interval=0.2)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_no_job_outlives_the_driver(slurm, cohort, tmp_path, sig):
    # 40 slides (links to the 4): the run is still busy when both jobs are running
    many = []
    for i in range(40):
        link = tmp_path / "many" / f"m{i:02d}.svs"
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(cohort[i % len(cohort)])
        many.append(link)
    proc = subprocess.Popen(embed_cmd(many, tmp_path / "s.zarr", *SLURM_ARGS, "--jobs", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_running(slurm, 2, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # the CLI turns both into "interrupted; rerun the same command to resume"
        assert proc.returncode == 130, err[-3000:]
        assert "interrupted; rerun the same command" in err
    assert slurm.wait_no_jobs() == [], "a worker job outlived the driver"
    # the reaper is gone too (another process: polled with a deadline)
    assert poll_until(lambda: not processes_matching("wsi_ssl.tiling._jobguard"), 30,
                      interval=0.2), processes_matching("wsi_ssl.tiling._jobguard")
    assert processes_matching("distributed.cli.dask_worker") == []


def test_cluster_check_reports_what_a_worker_sees(slurm, cohort, reference):
    out = run(["wsi-ssl", "cluster-check", *SLURM_ARGS, "--store", str(reference),
               "--slides", str(cohort[0].parent), "--json"])
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads(out.stdout)
    assert rep["ok"] and rep["cancelled"] and rep["problems"] == []
    (w,) = rep["workers"]
    assert w["store_visible"] is True and w["slides_missing"] == []
    assert w["slides_checked"] == len(cohort)
    assert w["wsi_ssl"] and w["python"] and w["gpus"] == [] and w["scratch_free_gb"] > 0
    assert "#SBATCH" in rep["job_script"]
    assert slurm.wait_no_jobs() == []
    # an unseen slide path is a problem the check names
    bad = run(["wsi-ssl", "cluster-check", *SLURM_ARGS, "--slides", "/nonexistent/x.svs"])
    assert bad.returncode != 0
