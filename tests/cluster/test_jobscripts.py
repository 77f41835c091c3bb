"""The batch job specs (wsi_ssl.tiling._jobqueue) without a batch system: validation, defaults
from WSI_SSL_<SYSTEM>_* and dask's jobqueue config, and the job scripts dask-jobqueue generates
for Slurm, PBS, LSF and SGE (what `wsi-ssl embed --cluster X --dry-run` prints)."""

from __future__ import annotations

import sys

import dask
import pytest

from tests.cluster.cluster_helpers import run
from wsi_ssl.errors import ConfigError
from wsi_ssl.tiling import JobQueueSpec, SlurmSpec
from wsi_ssl.tiling._cluster import plan_cluster
from wsi_ssl.tiling._jobqueue import job_name_for

GPU = {"jobs": 2, "gpus_per_job": 2, "cores": 16, "memory": "64GB", "partition": "gpuq",
       "account": "lab7", "walltime": "12:00:00", "job_extra": ("--constraint=a100",),
       "env_setup": ("module load cuda/12.1",), "local_directory": "$TMPDIR"}


def _worker_line(script: str) -> str:
    (line,) = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    return line


def test_slurm_script_asks_for_the_gpus_and_pins_one_worker_per_gpu():
    s = SlurmSpec(**GPU).job_script("wsi-ssl-x")
    for want in ("#SBATCH -J wsi-ssl-x", "#SBATCH -p gpuq", "#SBATCH -A lab7",
                 "#SBATCH --cpus-per-task=16", "#SBATCH -t 12:00:00", "#SBATCH --gres=gpu:2",
                 "#SBATCH --constraint=a100", "module load cuda/12.1",
                 "export WSI_SSL_GPUS_PER_JOB=2"):
        assert want in s.splitlines(), (want, s)
    w = _worker_line(s)
    assert w.startswith(f"{sys.executable} -m distributed.cli.dask_worker")  # the same python
    for want in ("--nworkers 2", "--nthreads 1", "--resources GPU=1",
                 "--preload-nanny wsi_ssl.tiling._jobguard", "--local-directory $TMPDIR"):
        assert want in w, (want, w)
    # env setup runs before the worker
    assert s.index("module load cuda/12.1") < s.index("distributed.cli.dask_worker")


@pytest.mark.parametrize("system, header, gpu_line, account_line", [
    ("pbs", "#PBS", "#PBS -l select=1:ncpus=16:ngpus=2:mem=60GB", "#PBS -A lab7"),
    ("lsf", "#BSUB", '#BSUB -gpu "num=2"', '#BSUB -P "lab7"'),
    ("sge", "#$", "#$ -l gpu=2", "#$ -P lab7"),
])
def test_pbs_lsf_sge_scripts(system, header, gpu_line, account_line):
    s = JobQueueSpec(system=system, **GPU).job_script("wsi-ssl-x")
    lines = s.splitlines()
    assert gpu_line in lines and account_line in lines, s
    assert f"{header} --constraint=a100" in lines
    assert "export WSI_SSL_GPUS_PER_JOB=2" in lines
    w = _worker_line(s)
    assert "--nworkers 2" in w and w.rstrip().endswith(
        "--nthreads 1 --resources GPU=1 --preload-nanny wsi_ssl.tiling._jobguard")


def test_cpu_jobs_have_no_gpu_lines_and_defaults_come_from_dask_config():
    with dask.config.set({"jobqueue.slurm.cores": 6, "jobqueue.slurm.memory": "20GB",
                          "jobqueue.slurm.queue": "fromconfig"}):
        spec = SlurmSpec(jobs=3)
        s = spec.job_script()
        assert "#SBATCH -p fromconfig" in s and "#SBATCH --cpus-per-task=6" in s
        assert spec.torch_threads == 6
        plan = plan_cluster(1, cluster=spec)  # one slide still goes to the batch jobs
    assert plan.kind == "batch" and plan.n_workers == 3
    assert "3 jobs x 1 CPU worker, 6 cores and 20GB per job" in plan.reason
    assert "gres" not in s and "GPUS_PER_JOB" not in s and "preload" not in s
    # nothing configured anywhere: 4 cores and 16 GB per worker
    assert SlurmSpec(gpus_per_job=2).resolved_cores() == 8
    assert SlurmSpec(gpus_per_job=2).resolved_memory() == "32GB"


def test_options_from_the_environment_and_bad_values():
    env = {"WSI_SSL_SLURM_JOBS": "2:8", "WSI_SSL_SLURM_PARTITION": "gpu",
           "WSI_SSL_SLURM_GPUS_PER_JOB": "4", "WSI_SSL_SLURM_ENV_SETUP": "module load a; x=1",
           "WSI_SSL_PBS_PARTITION": "not-for-slurm"}
    spec = SlurmSpec.from_env("slurm", env, partition="given")
    assert spec.jobs == (2, 8) and spec.adaptive and spec.max_jobs == 8
    assert spec.partition == "given"  # what is given wins over the environment
    assert spec.gpus_per_job == 4 and spec.env_setup == ("module load a", "x=1")
    assert JobQueueSpec.from_env("pbs", env).partition == "not-for-slurm"
    with pytest.raises(ConfigError, match="WSI_SSL_SLURM_CORES='many' is not a number"):
        SlurmSpec.from_env("slurm", {"WSI_SSL_SLURM_CORES": "many"})
    for bad, match in ((dict(jobs=0), "jobs=0"), (dict(jobs=(3, 2)), "min must be <= max"),
                       (dict(jobs=(0, 4)), "jobs min=0 must be an integer >= 1"),
                       (dict(gpus_per_job=-1), "gpus_per_job=-1"),
                       (dict(memory="lots"), "memory='lots'"),
                       (dict(system="condor"), "system='condor'")):
        with pytest.raises(ConfigError, match=match):
            JobQueueSpec(**bad)
    assert job_name_for("/a/b.zarr") == job_name_for("/a/../a/b.zarr") != job_name_for("/c.zarr")


def test_cli_dry_run_prints_the_script_and_submits_nothing(tmp_path):
    out = run([sys.executable, "-m", "wsi_ssl", "embed", "x.svs", "--store",
               str(tmp_path / "s.zarr"), "--encoder", "tiny-cnn", "--cluster", "lsf",
               "--gpus-per-job", "1", "--job-extra=-R rusage[ngpus_physical=1]",
               "--env-setup", "module load cuda", "--dry-run"], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("#!/usr/bin/env bash")
    assert f"#BSUB -J {job_name_for(tmp_path / 's.zarr')}" in out.stdout
    assert "#BSUB -R rusage[ngpus_physical=1]" in out.stdout
    assert not (tmp_path / "s.zarr").exists()
    bad = run([sys.executable, "-m", "wsi_ssl", "embed", "x.svs", "--store", "s.zarr",
               "--encoder", "tiny-cnn", "--gpus-per-job", "2"], timeout=120)
    assert bad.returncode == 1 and "--gpus-per-job is a batch-cluster option" in bad.stderr
