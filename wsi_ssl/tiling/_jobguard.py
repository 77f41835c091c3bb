"""Two small pieces that run outside the driver's own code, for batch-system runs
(:mod:`wsi_ssl.tiling._jobqueue`):

- **The job reaper**: a tiny process (``python -m wsi_ssl.tiling._jobguard``) in its own session
  that the driver feeds job ids through a pipe (``+ID`` submitted, ``-ID`` gone). When the pipe
  closes without ``exit`` (the driver ended in any way, ``kill -9`` included) it cancels every job
  still listed with the batch system's cancel command (``scancel``, ``qdel``, ``bkill``), so no
  worker job outlives the command. No polling, no PID files: the kernel closes the pipe.
- **GPU pinning** (``dask_setup``): a nanny preload (``--preload-nanny wsi_ssl.tiling._jobguard``)
  that gives the i-th worker process of a job with ``WSI_SSL_GPUS_PER_JOB=G`` GPUs its own
  ``CUDA_VISIBLE_DEVICES`` entry, chosen by :func:`~wsi_ssl.tiling._cluster.visible_gpus` from the
  job's allocation: the same placement rule as on one node, before the worker process (and CUDA)
  starts.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any

from wsi_ssl.tiling._cluster import visible_gpus

__all__ = ["JobReaper", "dask_setup", "gpu_for_worker"]

logger = logging.getLogger(__name__)


class JobReaper:
    """Start the reaper process; ``add``/``remove`` job ids; ``close()`` on a clean exit.

    Args:
        cancel_command: the batch system's cancel command (``"scancel"``...).
    """

    def __init__(self, cancel_command: str) -> None:
        self._lock = threading.Lock()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "wsi_ssl.tiling._jobguard", cancel_command],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
            text=True)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc.stdin is None or self._proc.stdin.closed:
                return
            try:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError) as err:  # the reaper died: jobs still get cancelled
                logger.debug("job reaper gone: %s", err)  # by close() and the workers' timeout

    def add(self, job_id: Any) -> None:
        if job_id:
            self._send(f"+{job_id}")

    def remove(self, job_id: Any) -> None:
        if job_id:
            self._send(f"-{job_id}")

    def close(self, *, cancel: bool = False) -> None:
        """End the reaper: ``cancel=False`` after the jobs were cancelled by the driver itself,
        ``True`` to have it cancel what is still listed (as on a crash)."""
        if not cancel:
            self._send("exit")
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def _reap(cancel_command: str) -> int:
    """The reaper's main loop (reads stdin until EOF)."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is for the driver
    ids: list[str] = []
    clean = False
    for line in sys.stdin:
        line = line.strip()
        if line == "exit":
            clean = True
        elif line.startswith("+") and line[1:] not in ids:
            ids.append(line[1:])
        elif line.startswith("-") and line[1:] in ids:
            ids.remove(line[1:])
    if clean or not ids:
        return 0
    cmd = shlex.split(cancel_command) + ids
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    sys.stderr.write(f"wsi-ssl job reaper: the driver ended; {' '.join(cmd)} -> "
                     f"{out.returncode} {out.stderr.strip()}\n")
    return 0


# ----------------------------------------------------------------------------- GPU pinning


def gpu_for_worker(name: Any, gpus_per_job: int, environ: dict[str, str] | None = None
                   ) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` of the worker process named ``name`` in a job of
    ``gpus_per_job`` workers (``"<job>-<i>"`` when several, dask's ``--nworkers`` naming), from the
    job's own allocation; ``None`` for CPU jobs."""
    if gpus_per_job < 1:
        return None
    idx = 0
    if gpus_per_job > 1:
        tail = str(name).rsplit("-", 1)[-1]
        idx = int(tail) if tail.isdigit() else 0
    env = os.environ if environ is None else environ
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:  # visible_gpus reads this process's CUDA_VISIBLE_DEVICES: give it the job's
        if env.get("CUDA_VISIBLE_DEVICES") is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
        gpus = visible_gpus(gpus_per_job)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    return gpus[idx % len(gpus)]


def dask_setup(nanny: Any) -> None:
    """Nanny preload: pin the worker process this nanny is about to start to one GPU."""
    try:
        g = int(os.environ.get("WSI_SSL_GPUS_PER_JOB", "0") or 0)
    except ValueError:
        g = 0
    dev = gpu_for_worker(getattr(nanny, "name", ""), g)
    if dev is None or not hasattr(nanny, "env"):
        return
    nanny.env["CUDA_VISIBLE_DEVICES"] = dev
    logger.info("worker %s pinned to CUDA_VISIBLE_DEVICES=%s", nanny.name, dev)


if __name__ == "__main__":  # the reaper process
    sys.exit(_reap(sys.argv[1] if len(sys.argv) > 1 else "scancel"))
