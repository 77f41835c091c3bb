"""Where ``embed_slides`` runs its slides: in this process, on a local dask cluster (one worker per
GPU when there are several), or on an existing cluster.

- :func:`plan_cluster` decides (pure logic, no process started) and says why, for the log: a
  cluster cannot pay off for one slide or one worker (starting workers, importing torch and
  building the encoder again cost seconds), so those run in this process.
- :func:`start_cluster` starts the planned local cluster. Several GPUs: one worker per GPU, each
  pinned by its own ``CUDA_VISIBLE_DEVICES`` (``dask_cuda.LocalCUDACluster`` when the optional
  ``gpu`` extra is installed, else a ``SpecCluster`` of nannies with per-worker ``env=``), so two
  workers never share a GPU.
- :func:`submit_options` honours clusters whose workers advertise a ``GPU`` resource
  (``dask worker --resources GPU=1``): slide tasks then ask for one GPU each.
- :func:`worker_device` is the device a worker builds its encoder on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from wsi_ssl.errors import ConfigError

__all__ = ["ClusterPlan", "plan_cluster", "start_cluster", "submit_options", "worker_device",
           "visible_gpus"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClusterPlan:
    """How ``embed_slides`` will run its slide tasks.

    Attributes:
        kind: ``"sync"`` (in this process), ``"local"`` (a local CPU cluster), ``"local-gpu"``
            (a local cluster with one worker per GPU), ``"existing"`` (the client given) or
            ``"batch"`` (workers in batch jobs: :mod:`~wsi_ssl.tiling._jobqueue`).
        n_workers: worker processes (1 for ``"sync"``; 0 when unknown for ``"existing"``; the
            most for ``"batch"``).
        torch_threads: torch threads per worker (``None``: leave torch's default, always so in
            this process).
        gpus: ``CUDA_VISIBLE_DEVICES`` value of each worker of a ``"local-gpu"`` plan (empty
            otherwise).
        reason: one line for the log saying why this plan was picked.
    """

    kind: Literal["sync", "local", "local-gpu", "existing", "batch"]
    n_workers: int
    torch_threads: int | None
    gpus: tuple[str, ...] = ()
    reason: str = ""

    def __post_init__(self) -> None:
        if self.kind == "local-gpu" and len(self.gpus) != self.n_workers:
            raise ConfigError(f"a local-gpu plan needs one GPU per worker; got {self.n_workers} "
                              f"workers and gpus={self.gpus!r}.")


def visible_gpus(n_gpus: int | None = None) -> tuple[str, ...]:
    """Ids of the GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries.

    Args:
        n_gpus: pretend this many GPUs exist (tests, planning for another machine); ``None``
            counts them with torch (without creating a CUDA context).

    Returns:
        The entries of this process's ``CUDA_VISIBLE_DEVICES`` (first ``n_gpus`` of them when
        given) or ``"0", "1", ...``.
    """
    if n_gpus is None:
        import torch  # lazy: torch takes ~1 s to import; only model code pays it

        n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if isinstance(n_gpus, bool) or not isinstance(n_gpus, int) or n_gpus < 0:
        raise ConfigError(f"n_gpus={n_gpus!r} must be an integer >= 0 (or None to count them).")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in env.split(",") if s.strip()] if env else []
    if len(ids) >= n_gpus > 0:
        return tuple(ids[:n_gpus])
    return tuple(str(i) for i in range(n_gpus))


def plan_cluster(n_tasks: int, *, client: Any = None, n_workers: int | None = None,
                 n_gpus: int | None = None, cores: int | None = None,
                 cluster: Any = None) -> ClusterPlan:
    """Pick in-process, a local (GPU) cluster, or the given cluster for ``n_tasks`` slide tasks.

    Args:
        n_tasks: slides to embed (tasks).
        client: ``embed_slides``'s ``client=``: ``None`` (decide here), ``"sync"``, a scheduler
            address or a ``distributed.Client`` (``"existing"``).
        n_workers: worker processes asked for (``None``: one per GPU, else one per 4 cores).
        n_gpus: GPUs on this machine (``None``: count them; tests pass a fake count).
        cores: CPU cores (``None``: ``os.cpu_count()``).
        cluster: a :class:`~wsi_ssl.tiling.JobQueueSpec`: always the ``"batch"`` plan (the
            user asked for the batch system; the login node is not for computing).

    Returns:
        A :class:`ClusterPlan`; log its ``reason``.
    """
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 0:
        raise ConfigError(f"n_tasks={n_tasks!r} must be an integer >= 0.")
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int)
                                  or n_workers < 1):
        raise ConfigError(f"n_workers={n_workers!r} must be an integer >= 1 (or None).")
    cores = int(cores or os.cpu_count() or 1)
    if cluster is not None:
        return ClusterPlan(kind="batch", n_workers=cluster.max_jobs * cluster.workers_per_job,
                           torch_threads=cluster.torch_threads, reason=cluster.describe())
    if isinstance(client, str) and client == "sync":
        return ClusterPlan(kind="sync", n_workers=1, torch_threads=None,
                           reason="in this process (client='sync')")
    if client is not None:
        return ClusterPlan(kind="existing", n_workers=0, torch_threads=None,
                           reason=f"on the given cluster ({_describe(client)})")
    gpus = visible_gpus(n_gpus)
    if gpus:
        n = min(len(gpus), n_tasks) if n_workers is None else min(n_workers, len(gpus))
        threads = max(1, cores // max(1, n) - 2)
    else:
        n = max(1, min(n_tasks, cores // 4)) if n_workers is None else n_workers
        threads = max(1, cores // max(1, n))
    n = max(1, min(n, max(1, n_tasks)))
    if n_tasks <= 1 or n == 1:
        why = "one slide" if n_tasks <= 1 else (
            "one GPU" if len(gpus) == 1 else "n_workers=1" if n_workers == 1
            else f"one worker fits {cores} cores")
        return ClusterPlan(kind="sync", n_workers=1, torch_threads=None,
                           reason=f"in this process: {why}, a local cluster cannot pay off")
    if gpus:
        return ClusterPlan(kind="local-gpu", n_workers=n, torch_threads=threads,
                           gpus=gpus[:n],
                           reason=f"local cluster: {n} workers, one per GPU "
                                  f"(CUDA_VISIBLE_DEVICES={','.join(gpus[:n])}), "
                                  f"{threads} torch threads each")
    return ClusterPlan(kind="local", n_workers=n, torch_threads=threads,
                       reason=f"local cluster: {n} CPU workers x {threads} torch threads "
                              f"for {n_tasks} slides")


def _describe(client: Any) -> str:
    if isinstance(client, str):
        return client
    return str(getattr(getattr(client, "scheduler", None), "address", None) or type(client).__name__)


def start_cluster(plan: ClusterPlan, *, use_dask_cuda: bool | None = None) -> tuple[Any, Any]:
    """Start the local cluster of a ``"local"`` / ``"local-gpu"`` plan.

    Args:
        plan: from :func:`plan_cluster`.
        use_dask_cuda: ``None``: ``dask_cuda.LocalCUDACluster`` when it is installed (the ``gpu``
            extra); ``False``: always the built-in per-worker ``CUDA_VISIBLE_DEVICES`` cluster.

    Returns:
        ``(client, cluster)``; close both when done.
    """
    from distributed import Client, LocalCluster  # lazy: dask.distributed only for cluster runs

    if plan.kind == "local":
        cluster = LocalCluster(n_workers=plan.n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    if plan.kind != "local-gpu":
        raise ConfigError(f"start_cluster needs a 'local' or 'local-gpu' plan; got {plan.kind!r}.")
    dask_cuda = None
    if use_dask_cuda is not False:
        try:
            import dask_cuda  # lazy: optional extra `gpu`
        except ImportError:
            if use_dask_cuda:
                raise ConfigError("use_dask_cuda=True needs dask-cuda: pip install "
                                  "'wsi-ssl[gpu]'.") from None
    if dask_cuda is not None:
        cluster = dask_cuda.LocalCUDACluster(CUDA_VISIBLE_DEVICES=list(plan.gpus),
                                             n_workers=plan.n_workers, threads_per_worker=1,
                                             dashboard_address=None)
    else:
        cluster = _pinned_cluster(plan.gpus)
    return Client(cluster), cluster


def _pinned_cluster(gpus: tuple[str, ...]) -> Any:
    """A SpecCluster with one single-threaded nanny per GPU, each with its own
    ``CUDA_VISIBLE_DEVICES`` and a ``GPU=1`` resource."""
    from distributed import (  # lazy: dask.distributed only for cluster runs
        Nanny,
        Scheduler,
        SpecCluster,
    )

    workers = {
        f"gpu-{dev}": {"cls": Nanny, "options": {
            "nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": dev}, "resources": {"GPU": 1},
            "name": f"gpu-{dev}", "dashboard": False}}
        for dev in gpus}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="wsi-ssl-gpu")


def submit_options(client: Any) -> dict[str, Any]:
    """Extra ``client.submit`` keywords: ``{"resources": {"GPU": 1}}`` when any worker of the
    cluster advertises a ``GPU`` resource (``dask worker --resources GPU=1``, or the workers of
    :func:`start_cluster`), so each slide task holds one GPU; ``{}`` otherwise."""
    try:
        workers = client.scheduler_info().get("workers", {})
    except (AttributeError, OSError) as err:
        logger.debug("cannot read the cluster's workers: %s", err)
        return {}
    if any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers.values()):
        return {"resources": {"GPU": 1}}
    return {}


def worker_device(device: str = "auto") -> str:
    """The torch device a worker (or this process) builds its encoder on.

    ``"auto"``: ``"cuda:0"`` when this process sees exactly one GPU (a worker pinned by
    ``CUDA_VISIBLE_DEVICES``); with several visible GPUs (an unpinned worker) the one with the
    most free memory, with a warning to pin workers (``dask cuda worker``); else ``"cpu"``.
    Anything else is returned unchanged.
    """
    if device != "auto":
        return device
    import torch  # lazy: torch takes ~1 s to import; only model code pays it

    if not torch.cuda.is_available():
        return "cpu"
    n = torch.cuda.device_count()
    if n <= 1:
        return "cuda:0"
    free = [torch.cuda.mem_get_info(i)[0] for i in range(n)]
    idx = max(range(n), key=lambda i: free[i])
    logger.warning("this worker sees %d GPUs and is not pinned to one; using cuda:%d (most free "
                   "memory). Start one worker per GPU (`dask cuda worker`, or CUDA_VISIBLE_DEVICES "
                   "per `dask worker`) so workers never share a GPU.", n, idx)
    return f"cuda:{idx}"
