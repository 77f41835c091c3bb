"""Worker jobs on an HPC batch system (Slurm, PBS, LSF, SGE) through dask-jobqueue.

``embed_slides(..., cluster=SlurmSpec(jobs=4, gpus_per_job=2))`` (``wsi-ssl embed --cluster
slurm``) runs its slide tasks on dask workers that live in batch jobs: dask.distributed for the
work, dask-jobqueue for the allocation, the batch system for the machines.

- :class:`JobQueueSpec` (and :class:`SlurmSpec`): what to ask for, per job. Options left ``None``
  come from dask's own jobqueue config (``jobqueue.slurm.*`` in ``~/.config/dask/jobqueue.yaml``
  or ``DASK_JOBQUEUE__SLURM__*``), the ecosystem's habit; :meth:`JobQueueSpec.from_env` also reads
  ``WSI_SSL_SLURM_*`` (``WSI_SSL_PBS_*``...) variables.
- One dask worker per GPU: a job with ``gpus_per_job=G`` runs G single-threaded worker processes,
  each pinned to one of the job's GPUs by ``CUDA_VISIBLE_DEVICES`` (the rule of
  :func:`~wsi_ssl.tiling._cluster.visible_gpus`, applied by a nanny preload before the worker
  starts) and advertising ``GPU=1``, so slide tasks hold one GPU each.
- :class:`BatchCluster`: the cluster of one run. Dead jobs (preempted, walltime, ``scancel``) are
  replaced; jobs that die before their worker connects stop the run after a few; every job is
  cancelled when the run ends, and a reaper process (:mod:`~wsi_ssl.tiling._jobguard`) cancels
  them if the driver is killed. Jobs are named after the store (``wsi-ssl-<8 hex>``), so a rerun
  on the same store also cancels what a killed run left queued.
- :func:`check_cluster`: one short job that reports what a worker sees (``wsi-ssl cluster-check``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from wsi_ssl._utils import expand_slide_items
from wsi_ssl._version import __version__
from wsi_ssl.errors import BackendUnavailableError, ConfigError, InputError, WsiSslError
from wsi_ssl.tiling._jobguard import JobReaper

__all__ = ["JobQueueSpec", "SlurmSpec", "BatchCluster", "ClusterError", "check_cluster",
           "ClusterCheckReport", "job_name_for", "check_paths_on_worker", "SYSTEMS"]

logger = logging.getLogger(__name__)

System = Literal["slurm", "pbs", "lsf", "sge"]
#: batch system -> (dask_jobqueue cluster class, the option that names the account)
SYSTEMS: dict[str, tuple[str, str]] = {"slurm": ("SLURMCluster", "account"),
                                       "pbs": ("PBSCluster", "account"),
                                       "lsf": ("LSFCluster", "project"),
                                       "sge": ("SGECluster", "project")}
_DEFAULT_CORES_PER_WORKER = 4
_DEFAULT_MEMORY_PER_WORKER_GB = 16


class ClusterError(WsiSslError, RuntimeError):
    """The batch cluster cannot run the work (jobs die before their worker connects, the
    scheduler is lost, compute nodes cannot see the inputs)."""


def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name}={v!r} must be an integer >= {lo}.")
    return v


@dataclass(frozen=True, kw_only=True)
class JobQueueSpec:
    """The worker jobs to submit to a batch system (validated on construction).

    Attributes:
        system: ``"slurm"``, ``"pbs"``, ``"lsf"`` or ``"sge"`` (a dask-jobqueue cluster class).
        jobs: number of jobs, or ``(min, max)`` to scale adaptively between them (min >= 1).
        gpus_per_job: GPUs per job; one dask worker per GPU, each pinned to its own (0: one CPU
            worker per job).
        cores: CPU cores per job (``None``: ``jobqueue.<system>.cores`` of dask's config, else
            4 per worker).
        memory: memory per job, e.g. ``"64GB"`` (``None``: dask's config, else 16 GB per
            worker).
        partition: partition / queue (``None``: dask's config ``queue``).
        account: account (Slurm, PBS) or project (LSF, SGE) to charge.
        walltime: per job, ``"HH:MM:SS"`` (``None``: dask's config, 30 min by default); jobs
            that reach it are replaced and lose only their in-flight slides.
        job_extra: raw directive lines added to the header, e.g. ``"--constraint=a100"``
            (written after ``#SBATCH`` / ``#PBS`` / ``#BSUB`` / ``#$``).
        env_setup: shell lines run in the job before the worker, e.g. ``"module load cuda"``.
        local_directory: the workers' scratch folder on the compute node (``$TMPDIR`` works:
            the job's shell expands it).
        log_directory: where the jobs write their output (``None``: the batch system's default,
            usually the submit folder).
        python: the Python on the compute nodes (``None``: dask's config, else this one).
        max_retries: a slide whose worker dies (job killed, preempted, out of memory) is
            retried on other workers this many times, then recorded as failed.
    """

    system: System = "slurm"
    jobs: int | tuple[int, int] = 1
    gpus_per_job: int = 0
    cores: int | None = None
    memory: str | None = None
    partition: str | None = None
    account: str | None = None
    walltime: str | None = None
    job_extra: tuple[str, ...] = ()
    env_setup: tuple[str, ...] = ()
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ConfigError(f"cluster system={self.system!r} must be one of "
                              f"{', '.join(SYSTEMS)}.")
        jobs = self.jobs
        if isinstance(jobs, (list, tuple)):
            if len(jobs) != 2:
                raise ConfigError(f"jobs={jobs!r} must be a number or (min, max).")
            # min >= 1: the run waits for a first worker before it submits any slide task,
            # so an adaptive cluster at 0 jobs would never see work that makes it grow
            lo, hi = _int("jobs min", jobs[0], 1), _int("jobs max", jobs[1], 1)
            if lo > hi:
                raise ConfigError(f"jobs={jobs!r}: min must be <= max.")
            object.__setattr__(self, "jobs", (lo, hi))
        else:
            _int("jobs", jobs, 1)
        _int("gpus_per_job", self.gpus_per_job, 0)
        _int("max_retries", self.max_retries, 0)
        if self.cores is not None:
            _int("cores", self.cores, 1)
        if self.memory is not None:
            from dask.utils import parse_bytes  # lazy: dask only for cluster runs

            try:
                parse_bytes(str(self.memory))
            except (ValueError, TypeError) as err:
                raise ConfigError(f"memory={self.memory!r} is not a size like '64GB'.") from err
        for name in ("job_extra", "env_setup"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, name, tuple(str(x) for x in v))

    # ------------------------------------------------------------------ derived
    @property
    def adaptive(self) -> bool:
        return isinstance(self.jobs, tuple)

    @property
    def max_jobs(self) -> int:
        return self.jobs[1] if isinstance(self.jobs, tuple) else self.jobs

    @property
    def workers_per_job(self) -> int:
        return max(1, self.gpus_per_job)

    def resolved_cores(self) -> int:
        import dask  # lazy: dask only for cluster runs

        c = self.cores or dask.config.get(f"jobqueue.{self.system}.cores", None)
        return int(c or _DEFAULT_CORES_PER_WORKER * self.workers_per_job)

    def resolved_memory(self) -> str:
        import dask  # lazy: dask only for cluster runs

        m = self.memory or dask.config.get(f"jobqueue.{self.system}.memory", None)
        return str(m or f"{_DEFAULT_MEMORY_PER_WORKER_GB * self.workers_per_job}GB")

    @property
    def torch_threads(self) -> int:
        return max(1, self.resolved_cores() // self.workers_per_job)

    def describe(self) -> str:
        jobs = f"{self.jobs[0]}-{self.jobs[1]} jobs (adaptive)" if self.adaptive else \
            f"{self.jobs} job{'s' if self.jobs != 1 else ''}"
        per = (f"{self.gpus_per_job} GPU worker{'s' if self.gpus_per_job > 1 else ''} "
               "(one per GPU, pinned)" if self.gpus_per_job else "1 CPU worker")
        return (f"{self.system} through dask-jobqueue: {jobs} x {per}, "
                f"{self.resolved_cores()} cores and {self.resolved_memory()} per job")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_env(cls, system: System = "slurm", environ: Mapping[str, str] | None = None,
                 **given: Any) -> JobQueueSpec:
        """A spec from ``given`` values, then ``WSI_SSL_<SYSTEM>_<FIELD>`` environment variables
        (``WSI_SSL_SLURM_PARTITION=gpu``, ``WSI_SSL_SLURM_JOBS=2:8``, ``WSI_SSL_SLURM_JOB_EXTRA``
        and ``..._ENV_SETUP`` split on ``;``); what is still unset comes from dask's jobqueue
        config when the jobs are made. ``None`` values in ``given`` count as unset."""
        env = os.environ if environ is None else environ
        prefix = f"WSI_SSL_{str(system).upper()}_"
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "system":
                continue
            if given.get(f.name) not in (None, (), []):
                kw[f.name] = given[f.name]
                continue
            raw = env.get(prefix + f.name.upper())
            if raw is None or not raw.strip():
                continue
            kw[f.name] = _parse_env(f.name, raw.strip(), prefix + f.name.upper())
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown cluster option(s) {sorted(unknown)}.")
        if cls is SlurmSpec:
            return cls(**kw)
        return cls(system=system, **kw)

    def job_kwargs(self, job_name: str) -> dict[str, Any]:
        """Keywords of the dask-jobqueue cluster / job class for these jobs."""
        import dask  # lazy: dask only for cluster runs

        sysname = self.system
        cfg = f"jobqueue.{sysname}"
        g = self.gpus_per_job
        extra_args = list(dask.config.get(f"{cfg}.worker-extra-args", None) or [])
        cores, procs = self.resolved_cores(), self.workers_per_job
        if sysname != "slurm" and cores // procs != 1:
            extra_args += ["--nthreads", "1"]  # one slide at a time per worker (last one wins)
        if g:
            extra_args += ["--resources", "GPU=1", "--preload-nanny", "wsi_ssl.tiling._jobguard"]
        prologue = list(dask.config.get(f"{cfg}.job-script-prologue", None) or [])
        prologue += list(self.env_setup)
        # a slide task's memory is torch's, unmanaged by dask: pausing a worker at 80% would
        # stall it for good (its last result waits there); the nanny still restarts a worker at
        # 95% of its memory limit, and the slide is retried elsewhere
        prologue.append("export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=false")
        if g:
            prologue.append(f"export WSI_SSL_GPUS_PER_JOB={g}")
        directives = list(dask.config.get(f"{cfg}.job-extra-directives", None) or [])
        kw: dict[str, Any] = {
            "cores": cores, "memory": self.resolved_memory(), "processes": procs,
            "job_name": job_name,
            "worker_extra_args": extra_args, "job_script_prologue": prologue,
        }
        if sysname == "slurm":  # --cpus-per-task=cores; dask: one thread per worker
            kw.update(job_cpu=cores, cores=procs)
        if g:
            if sysname == "slurm":
                directives.append(f"--gres=gpu:{g}")
            elif sysname == "lsf":
                directives.append(f'-gpu "num={g}"')
            elif sysname == "sge":
                directives.append(f"-l gpu={g}")
            elif sysname == "pbs":
                from dask.utils import parse_bytes  # lazy: dask only for cluster runs
                from dask_jobqueue.pbs import pbs_format_bytes_ceil  # lazy: optional extra `hpc`

                mem = pbs_format_bytes_ceil(parse_bytes(self.resolved_memory()))
                kw["resource_spec"] = (f"select=1:ncpus={self.resolved_cores()}:ngpus={g}"
                                       f":mem={mem}")
        kw["job_extra_directives"] = directives + list(self.job_extra)
        for name, key in (("partition", "queue"), ("walltime", "walltime"),
                          ("local_directory", "local_directory"),
                          ("log_directory", "log_directory"), ("python", "python")):
            v = getattr(self, name)
            if v is not None:
                kw[key] = v
        if self.account is not None:
            kw[SYSTEMS[sysname][1]] = self.account
        return kw

    def job_script(self, job_name: str = "wsi-ssl", *,
                   scheduler: str = "tcp://SCHEDULER-ADDRESS:PORT") -> str:
        """The job script that would be submitted (``--dry-run``), without starting anything.
        The scheduler address is only known when the run starts."""
        job_cls = _job_class(self.system)
        kw = self.job_kwargs(job_name)
        return job_cls(scheduler, name=f"{job_name}-worker", **kw).job_script()


@dataclass(frozen=True, kw_only=True)
class SlurmSpec(JobQueueSpec):
    """:class:`JobQueueSpec` for Slurm (``dask_jobqueue.SLURMCluster``)."""

    system: Literal["slurm"] = "slurm"


def _parse_env(name: str, raw: str, var: str) -> Any:
    try:
        if name == "jobs":
            if ":" in raw:
                lo, hi = raw.split(":", 1)
                return (int(lo), int(hi))
            return int(raw)
        if name in ("gpus_per_job", "cores", "max_retries"):
            return int(raw)
    except ValueError as err:
        raise ConfigError(f"{var}={raw!r} is not a number (or MIN:MAX for JOBS).") from err
    if name in ("job_extra", "env_setup"):
        return tuple(s.strip() for s in raw.split(";") if s.strip())
    return raw


def _jobqueue_module() -> Any:

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        import dask_jobqueue  # lazy: optional extra `hpc`
    except ImportError as err:
        raise BackendUnavailableError(
            "running on a batch cluster needs dask-jobqueue: pip install 'wsi-ssl[hpc]'."
        ) from err
    finally:
        # dask_jobqueue.runner, imported by the package, replaces the SIGINT handler with
        # `sys.exit()` (exit status 0, no KeyboardInterrupt): put the previous one back
        if main and before is not None and signal.getsignal(signal.SIGINT) is not before:
            signal.signal(signal.SIGINT, before)
    return dask_jobqueue


def _job_class(system: str) -> Any:
    mod = _jobqueue_module()
    return getattr(mod, SYSTEMS[system][0]).job_cls


def job_name_for(store_path: str | os.PathLike) -> str:
    """``wsi-ssl-<8 hex>``: the job name of every run on this store (found again by a rerun)."""
    h = hashlib.sha256(str(Path(store_path).resolve()).encode()).hexdigest()[:8]
    return f"wsi-ssl-{h}"


def _has_bokeh() -> bool:

    return importlib.util.find_spec("bokeh") is not None


# ----------------------------------------------------------------------------- the cluster


class BatchCluster:
    """The dask-jobqueue cluster of one run (a context manager).

    On enter: cancels jobs a killed run on the same store left (Slurm: by job name), starts the
    scheduler in this process, submits the jobs and a reaper process. Meanwhile a keeper thread
    replaces jobs that died and records jobs that died before their worker connected
    (:meth:`raise_if_failed`). On exit: cancels every job and waits until the batch system says
    they are gone (Slurm), then stops the reaper.

    Args:
        spec: the jobs.
        job_name: the jobs' name (:func:`job_name_for`).
        early_death_limit: jobs that may die before their worker connects before the run stops
            (default ``max(3, 2 x max jobs)``).
    """

    def __init__(self, spec: JobQueueSpec, *, job_name: str,
                 early_death_limit: int | None = None, poll_s: float = 1.0) -> None:
        self.spec = spec
        self.job_name = job_name
        self.client: Any = None
        self.cluster: Any = None
        self.dashboard: str | None = None
        self.early_death_limit = early_death_limit or max(3, 2 * spec.max_jobs)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._error: str | None = None
        self._reaper: Any = None
        self._keeper: threading.Thread | None = None
        self._seen: set[str] = set()  # job names whose worker connected once
        self._names_seen: set[str] = set()  # every worker name that connected (a plugin adds)
        self._early_deaths = 0
        self.replaced = 0
        self._job_ids: set[str] = set()
        self.submitted: list[str] = []  # every job id this run submitted

    # ------------------------------------------------------------------ start
    def __enter__(self) -> BatchCluster:
        import dask  # lazy: dask only for cluster runs
        from distributed import Client  # lazy: dask.distributed only for cluster runs

        mod = _jobqueue_module()
        cls = getattr(mod, SYSTEMS[self.spec.system][0])
        self._cancel_leftovers()
        self._reaper = JobReaper(cls.job_cls.cancel_command)
        job_cls = _guarded_job_class(cls.job_cls, self)
        sched = {"dashboard_address": ":0" if _has_bokeh() else None}
        try:
            with dask.config.set({"distributed.scheduler.allowed-failures":
                                  self.spec.max_retries}):
                self.cluster = cls(job_cls=job_cls, scheduler_options=sched,
                                   **self.spec.job_kwargs(self.job_name))
            if self.spec.adaptive:
                lo, hi = self.spec.jobs  # type: ignore[misc]
                self.cluster.adapt(minimum_jobs=lo, maximum_jobs=hi)
            else:
                self.cluster.scale(jobs=self.spec.jobs)
            self.client = Client(self.cluster)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.cluster.loop.add_callback(self.cluster.scheduler.add_plugin,
                                       _seen_workers_plugin(self._names_seen))
        if sched["dashboard_address"]:
            self.dashboard = self.client.dashboard_link
        logger.info("%s; scheduler %s%s", self.spec.describe(), self.cluster.scheduler_address,
                    f", dashboard {self.dashboard}" if self.dashboard else "")
        self._keeper = threading.Thread(target=self._keep, name="wsi-ssl-job-keeper",
                                        daemon=True)
        self._keeper.start()
        return self

    def _cancel_leftovers(self) -> None:
        """Slurm: cancel this user's queued/running jobs of this name (a killed earlier run on
        the same store; the store's lock guarantees no live run uses them)."""
        if self.spec.system != "slurm" or shutil.which("squeue") is None:
            return
        try:
            out = subprocess.run(["squeue", "-h", "--me", "-n", self.job_name, "-o", "%i"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as err:
            logger.debug("squeue failed: %s", err)
            return
        ids = out.stdout.split()
        if out.returncode == 0 and ids:
            logger.warning("cancelling %d job(s) named %s left by an earlier run on this store: "
                           "%s", len(ids), self.job_name, " ".join(ids))
            subprocess.run(["scancel", *ids], capture_output=True, timeout=60)

    # ------------------------------------------------------------------ job bookkeeping
    def _job_started(self, job: Any) -> None:
        self._job_ids.add(str(job.job_id))
        self.submitted.append(str(job.job_id))
        self._reaper.add(job.job_id)
        logger.info("submitted job %s (%s)", job.job_id, job.name)

    def _job_closed(self, job: Any) -> None:
        self._job_ids.discard(str(job.job_id))
        self._reaper.remove(job.job_id)

    def workers_alive(self) -> int:
        try:
            return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        except Exception:  # noqa: BLE001 - while the scheduler is busy or closing
            return 0

    def jobs_running(self) -> int:
        return len(self._job_ids)

    def _slurm_states(self, ids: Sequence[str]) -> dict[str, str] | None:
        if not ids:
            return {}
        try:
            out = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0 and "Invalid job id" not in out.stderr:
            return None
        return dict(line.split(None, 1) for line in out.stdout.strip().splitlines() if line)

    def _keep(self) -> None:
        """Every ``poll_s``: note which jobs have connected workers; replace dead jobs."""
        missing_since: dict[str, float] = {}
        while not self._stop.wait(self._poll_s):
            try:
                self._keep_once(missing_since)
            except Exception as err:  # noqa: BLE001 - never kill the run from here
                logger.debug("job keeper: %s", err)

    def _keep_once(self, missing_since: dict[str, float]) -> None:
        cl = self.cluster
        if cl is None or self._stop.is_set():
            return
        names = {str(w.get("name")) for w in
                 self.client.scheduler_info(n_workers=-1).get("workers", {}).values()}
        jobs = dict(cl.workers)  # name -> Job
        connected = {n for n in jobs
                     if n in names or any(w.startswith(f"{n}-") for w in names)}
        ever = set(self._names_seen)
        self._seen |= connected | {n for n in jobs
                                   if n in ever or any(w.startswith(f"{n}-") for w in ever)}
        with_id = {n: j for n, j in jobs.items() if getattr(j, "job_id", None)}
        dead: list[str] = []
        if self.spec.system == "slurm":
            states = self._slurm_states([str(j.job_id) for j in with_id.values()])
            if states is None:
                return
            for n, j in with_id.items():
                st = states.get(str(j.job_id))
                if st is None or st in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT",
                                        "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
                                        "BOOT_FAIL", "DEADLINE"):
                    dead.append(n)
        else:  # no status query: a job whose workers all left 60 s ago is gone
            now = time.monotonic()
            for n in with_id:
                if n in self._seen and n not in connected:
                    if now - missing_since.setdefault(n, now) > 60:
                        dead.append(n)
                else:
                    missing_since.pop(n, None)
        if not dead or self._stop.is_set():
            return
        early = [n for n in dead if n not in self._seen]
        self._early_deaths += len(early)
        for n in dead:
            job = jobs[n]
            logger.warning("worker job %s (%s) ended%s; %s", job.job_id, n,
                           " before its worker connected" if n in early else "",
                           "replacing it" if not self._error else "not replacing it")
            self._job_closed(job)
        if self._early_deaths >= self.early_death_limit:
            where = (f" (their output is in {self.spec.log_directory})"
                     if self.spec.log_directory else
                     " (their output: slurm-<jobid>.out, or the batch system's default, in the "
                     "folder the run started from)")
            self._error = (f"{self._early_deaths} worker jobs ended before their dask worker "
                           f"connected{where}; check --env-setup, --python and that the "
                           "compute nodes can reach this host, then rerun the same command.")
        cl.loop.add_callback(self._replace, dead)

    def _replace(self, dead: list[str]) -> None:
        cl = self.cluster
        for n in dead:
            cl.worker_spec.pop(n, None)
            cl.workers.pop(n, None)
        self.replaced += len(dead)
        if self._error or self._stop.is_set():
            return
        if not self.spec.adaptive:
            cl.scale(jobs=self.spec.jobs)  # submits new jobs for the dropped ones

    def raise_if_failed(self) -> None:
        if self._error:
            raise ClusterError(self._error)

    # ------------------------------------------------------------------ stop
    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._keeper is not None:
            self._keeper.join(timeout=30)
        ids = sorted(self._job_ids)
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close(timeout=60)
        except Exception as err:  # noqa: BLE001 - the reaper still cancels the jobs
            logger.warning("closing the batch cluster failed (%s); cancelling its jobs", err)
            if self._reaper is not None:
                self._reaper.close(cancel=True)
                self._reaper = None
        finally:
            if self._reaper is not None:
                # whatever is still listed was not cancelled by close(): let the reaper do it
                self._reaper.close(cancel=bool(self._job_ids))
            if self.spec.system == "slurm" and ids:
                self._wait_gone(ids)

    def _wait_gone(self, ids: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self._slurm_states(ids)
            if states is not None and not states:
                return
            time.sleep(0.5)
        logger.warning("jobs %s are still listed by squeue %.0f s after being cancelled",
                       " ".join(ids), timeout)


def _seen_workers_plugin(names: set[str]) -> Any:
    """A scheduler plugin (the scheduler runs in this process) that adds the name of every
    worker that connects to ``names``: a job killed between two keeper polls still counts as
    having connected."""
    from distributed.diagnostics.plugin import SchedulerPlugin  # lazy: dask only for clusters

    class SeenWorkers(SchedulerPlugin):
        name = "wsi-ssl-seen-workers"

        def add_worker(self, scheduler: Any = None, worker: str = "") -> None:
            ws = scheduler.workers.get(worker) if scheduler is not None else None
            if ws is not None:
                names.add(str(ws.name))

    return SeenWorkers()


def _guarded_job_class(job_cls: Any, owner: BatchCluster) -> Any:
    """``job_cls`` that reports each submitted / closed job to ``owner`` (its reaper)."""

    class GuardedJob(job_cls):  # type: ignore[misc, valid-type]
        async def start(self) -> None:
            await super().start()
            owner._job_started(self)

        async def close(self) -> None:
            try:
                await super().close()
            finally:
                owner._job_closed(self)

    GuardedJob.__name__ = f"Guarded{job_cls.__name__}"
    return GuardedJob


# ----------------------------------------------------------------------------- checks


def check_paths_on_worker(paths: Sequence[str], store: str | None) -> dict[str, Any]:
    """Run on a worker: which of ``paths`` (and the store folder) it cannot see."""
    return {"host": socket.gethostname(),
            "missing": [p for p in paths if not os.path.exists(p)],
            "store_visible": None if store is None else os.path.isdir(store)}


def sample_paths(paths: Sequence[str], n: int = 64) -> list[str]:
    """Up to ``n`` of ``paths``, spread evenly (first and last included)."""
    paths = list(paths)
    if len(paths) <= n:
        return paths
    step = (len(paths) - 1) / (n - 1)
    return [paths[round(i * step)] for i in range(n)]


@dataclass(frozen=True, kw_only=True)
class ClusterCheckReport:
    """What one worker of a batch job saw (``wsi-ssl cluster-check``).

    Attributes:
        system: the batch system; job_script: the script submitted.
        workers: one dict per worker process of the job: ``host``, ``cuda_visible_devices``,
            ``gpus`` (names), ``cuda`` (torch's CUDA version or ``None``), ``torch``,
            ``python``, ``wsi_ssl`` (version), ``scratch`` (folder) and ``scratch_free_gb``,
            ``store_visible``, ``slides_missing`` (of the sample checked), ``slides_checked``.
        seconds_to_first_worker: from submission to the first worker connecting.
        cancelled: the job was gone from the queue when the check ended.
        problems: one line per thing that would stop a run (empty: ready).
    """

    system: str
    job_script: str
    workers: tuple[dict[str, Any], ...]
    seconds_to_first_worker: float
    cancelled: bool
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def _probe(paths: Sequence[str], store: str | None) -> dict[str, Any]:
    """Run on a worker: what it sees."""

    out: dict[str, Any] = check_paths_on_worker(paths, store)
    out.update(python=platform.python_version(), wsi_ssl=__version__,
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
               slides_checked=len(paths), slides_missing=out.pop("missing"))
    try:
        import torch  # lazy: torch takes ~1 s to import; only model code pays it

        out.update(torch=torch.__version__, cuda=torch.version.cuda,
                   gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                   if torch.cuda.is_available() else [])
    except Exception as err:  # noqa: BLE001 - reported, not raised
        out.update(torch=f"cannot import torch: {err}", cuda=None, gpus=[])
    try:
        from distributed import get_worker  # lazy: dask.distributed only for cluster runs

        scratch = get_worker().local_directory
    except Exception:  # noqa: BLE001
        scratch = os.environ.get("TMPDIR") or "/tmp"
    out["scratch"] = scratch
    try:
        out["scratch_free_gb"] = round(shutil.disk_usage(scratch).free / 1e9, 1)
    except OSError:
        out["scratch_free_gb"] = None
    return out


def check_cluster(spec: JobQueueSpec, *, store: str | os.PathLike | None = None,
                  slides: Sequence[str | os.PathLike] = (), timeout: float = 600) -> (
                      ClusterCheckReport):
    """Submit one job of ``spec`` (``jobs`` is ignored), report what its workers see, cancel it.

    Args:
        spec: the jobs (GPUs, cores, memory, partition...) a run would ask for.
        store: a tile store path the workers should see (optional).
        slides: slide files, folders or globs; a sample of 64 is checked on the workers.
        timeout: seconds to wait for the job to start (it may queue).

    Returns:
        A :class:`ClusterCheckReport`; ``problems`` lists what would stop a run.
    """
    paths: list[str] = []
    if slides:
        paths = [os.path.abspath(p) for p in expand_slide_items(list(slides))]
    store_s = os.path.abspath(store) if store is not None else None
    one = replace(spec, jobs=1)
    name = "wsi-ssl-check"
    t0 = time.perf_counter()
    problems: list[str] = []
    with BatchCluster(one, job_name=name, early_death_limit=1) as bc:
        script = bc.cluster.job_script()
        n = one.workers_per_job
        deadline = time.monotonic() + timeout
        while len(bc.client.scheduler_info(n_workers=-1).get("workers", {})) < n:
            bc.raise_if_failed()
            if time.monotonic() > deadline:
                raise ClusterError(f"the check job did not start within {timeout:.0f} s (it may "
                                   "still be queued: see squeue/qstat); rerun with a longer "
                                   "--timeout or another --partition.")
            time.sleep(0.5)
        t_first = time.perf_counter() - t0
        seen = bc.client.run(_probe, sample_paths(paths), store_s)
        workers = tuple(seen[a] for a in sorted(seen))
    cancelled = True
    if one.system == "slurm":
        left = bc._slurm_states(bc.submitted)
        cancelled = left is not None and not left
    for w in workers:
        if w.get("slides_missing"):
            problems.append(f"worker on {w['host']} cannot see {len(w['slides_missing'])} of "
                            f"{w['slides_checked']} slides checked, e.g. "
                            f"'{w['slides_missing'][0]}'")
        if store_s is not None and not w.get("store_visible"):
            problems.append(f"worker on {w['host']} cannot see the store folder '{store_s}'")
        if w.get("wsi_ssl") != __version__:
            problems.append(f"worker on {w['host']} runs wsi-ssl {w.get('wsi_ssl')}, this host "
                            f"{__version__}")
        if one.gpus_per_job and len(w.get("gpus") or []) != 1:
            problems.append(f"worker on {w['host']} sees {len(w.get('gpus') or [])} GPUs "
                            f"(CUDA_VISIBLE_DEVICES={w.get('cuda_visible_devices')}), expected "
                            "exactly 1")
    return ClusterCheckReport(system=one.system, job_script=script, workers=workers,
                              seconds_to_first_worker=t_first, cancelled=cancelled,
                              problems=tuple(dict.fromkeys(problems)))


def check_inputs_on_cluster(client: Any, paths: Sequence[str], store: str | None,
                            extra: Sequence[str] = ()) -> None:
    """Before any slide is scattered: the first worker must see a sample of the slide paths and
    the encoder's weights file(s) (``extra``); raise :class:`InputError` in one line if not. A
    store folder it cannot see is only logged: the workers never write it (the driver does)."""
    sample = sample_paths(paths) + [p for p in extra if p]
    fut = client.submit(check_paths_on_worker, sample, store, pure=False)
    res = fut.result()
    fut.release()
    if res["missing"]:
        miss = res["missing"]
        raise InputError(
            f"the workers cannot see {len(miss)} of the {len(sample)} input files checked (e.g. "
            f"'{miss[0]}' is missing on host {res['host']}); put the slides and weights on a "
            "filesystem the compute nodes mount at the same path, then rerun.")
    if store is not None and res["store_visible"] is False:
        logger.info("the workers cannot see the store folder '%s' (host %s); fine: only this "
                    "process writes it", store, res["host"])
