"""Chaos: a 20-slide `wsi-ssl embed --cluster slurm --jobs 2` on the real single-node Slurm
cluster (tests/cluster/slurm_local.py) while a seeded killer strikes at a random moment (after a
random number of slides are complete, plus a random delay), in turn:

- ``worker``: SIGKILL one dask worker process (its nanny restarts it),
- ``all-workers``: SIGKILL every worker process,
- ``scheduler``: SIGKILL the dask scheduler. With dask-jobqueue the scheduler lives inside the
  driver process, so this round runs the hand-started layout instead: a ``dask scheduler``
  process, two ``dask worker`` Slurm jobs, ``wsi-ssl embed --scheduler tcp://...``; the driver
  must stop with one line, and the rerun (new scheduler, new jobs) finishes the store,
- ``driver``: SIGKILL the ``wsi-ssl embed`` process, then rerun the same command,
- ``scancel``: ``scancel`` one of the run's worker jobs (it is replaced).

After each round: the store is array-for-array identical to a clean in-process run, `verify` is
clean, every slide the interrupted run had marked complete was already identical (no slide marked
complete that is not), and no job, worker, scheduler or reaper process is left. Each round prints
what was killed and when; a failure names the round and its seed (replay one round with
``WSI_SSL_CHAOS_SEED=<seed> WSI_SSL_CHAOS_ROUNDS=1 pytest -m chaos tests/test_chaos.py``).

Not in the default run (marker ``chaos``); `.ci/run` runs it as its own step. Rounds: up to
``WSI_SSL_CHAOS_ROUNDS`` (10), as many as fit ``WSI_SSL_CHAOS_BUDGET_S`` (300 s); the number run
is printed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests._helpers import poll_until, wait_until
from tests.cluster.cluster_helpers import (
    EMBED_KW,
    SLURM_ARGS,
    embed_cmd,
    make_cohort,
    processes_matching,
    store_arrays,
)
from tests.cluster.slurm_local import LocalSlurm
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import embed_slides

pytestmark = [pytest.mark.slow, pytest.mark.chaos, pytest.mark.slurm]

KINDS = ("worker", "all-workers", "scheduler", "driver", "scancel")
N_SLIDES = 20


# ------------------------------------------------------------------------------ processes


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _worker_processes() -> list[int]:
    """The dask worker processes (children of the `dask worker` nannies)."""
    nannies = {int(line.split()[0]) for line in processes_matching("distributed.cli.dask_worker")}
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and _ppid(int(d.name)) in nannies:
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in cmd or b"forkserver" in cmd:  # the worker, not the tracker
                out.append(int(d.name))
    return sorted(out)


def _running(slurm: LocalSlurm) -> list[str]:
    left = [f"job {j}" for j in slurm.jobs()]
    for text in ("distributed.cli.dask_worker", "wsi_ssl.tiling._jobguard",
                 "distributed.cli.dask_scheduler", "wsi_ssl embed"):
        left += processes_matching(text)
    return left


def _leftovers(slurm: LocalSlurm) -> list[str]:
    """Jobs, workers, schedulers and reapers still around (other processes: polled for up to
    60 s)."""
    poll_until(lambda: not _running(slurm), 60, interval=0.5)
    return _running(slurm)


def _n_complete(store: Path) -> int:
    if not (store / "zarr.json").exists():
        return 0
    try:
        return len(TileStore(store, mode="r").slide_ids)
    except Exception:  # noqa: BLE001 - being written right now
        return 0


# ------------------------------------------------------------------------------ the rounds


class Round:
    def __init__(self, slurm, cohort, ref, root: Path, r: int, seed: int) -> None:
        self.slurm, self.cohort, self.ref = slurm, cohort, ref
        self.r, self.seed = r, seed
        self.kind = KINDS[seed % len(KINDS)]
        self.rng = random.Random(seed)
        self.dir = root / f"round{r:02d}-{self.kind}"
        self.dir.mkdir()
        self.store = self.dir / "s.zarr"
        self.log: list[str] = []
        self.t0 = time.monotonic()
        self._sched: subprocess.Popen | None = None

    def say(self, msg: str) -> None:
        self.log.append(f"{time.monotonic() - self.t0:6.1f}s {msg}")

    # the hand-started layout of the scheduler round
    def _start_scheduler(self, tag: str) -> str:
        sf = self.dir / f"scheduler-{tag}.json"
        self._sched = subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(sf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def written() -> bool:
            assert self._sched.poll() is None, "the dask scheduler exited"
            return sf.exists() and bool(sf.read_text().strip())

        wait_until(written, 60, "the dask scheduler's file", interval=0.1)  # another process

        addr = json.loads(sf.read_text())["address"]
        for i in range(2):
            self.slurm.run(
                "sbatch", "-J", "wsi-chaos-worker", "-c", "1", "--mem", "2G",
                "-o", str(self.dir / f"worker-{tag}-{i}.out"), "--wrap",
                f"export DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE=false; exec {sys.executable} "
                f"-m distributed.cli.dask_worker {addr} --nthreads 1 --memory-limit 2GB "
                "--death-timeout 15")
        return addr

    def _stop_hand_started(self) -> None:
        if self._sched is not None and self._sched.poll() is None:
            self._sched.kill()
            self._sched.wait()
        ids = [j for j, name, _ in self.slurm.jobs() if name == "wsi-chaos-worker"]
        if ids:
            self.slurm.run("scancel", *ids, check=False)

    def command(self, tag: str) -> list[str]:
        if self.kind == "scheduler":
            return embed_cmd(self.cohort, self.store, "--scheduler", self._start_scheduler(tag))
        return embed_cmd(self.cohort, self.store, *SLURM_ARGS, "--jobs", "2", "--max-retries",
                         "3", "--log-directory", str(self.dir / "logs"))

    def run(self) -> None:
        after = self.rng.randint(0, 10)
        delay = self.rng.uniform(0.0, 0.5)
        proc = subprocess.Popen(self.command("a"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.say(f"started the driver (pid {proc.pid}); strike after {after} slides "
                 f"+ {delay:.2f} s")
        killed = self._strike(proc, after, delay)
        out, err = proc.communicate(timeout=240)
        self.say(f"driver exited rc={proc.returncode}")
        # every slide the interrupted run marked complete is right
        partial = store_arrays(self.store) if (self.store / "zarr.json").exists() else {}
        self._check_arrays(partial, subset=True)
        self.say(f"{len(partial)} slides complete after the strike, all identical")
        rerun = proc.returncode != 0
        if killed in ("driver", "scheduler"):
            assert proc.returncode != 0 or len(partial) == N_SLIDES, err[-2000:]
        if killed == "scheduler" and proc.returncode != 0:
            # a strike at 0 slides can land before the driver has connected: then the one-line
            # error says it cannot connect instead of that it lost the scheduler
            assert ("lost the dask scheduler" in err
                    or "cannot connect to the dask scheduler" in err), err[-2000:]
        if rerun:
            if self.kind == "scheduler":
                self._stop_hand_started()
            again = subprocess.run(self.command("b"), capture_output=True, text=True,
                                   timeout=240)
            self.say(f"rerun rc={again.returncode}")
            assert again.returncode == 0, again.stderr[-3000:]
        if self.kind == "scheduler":
            self._stop_hand_started()
        self._check_arrays(store_arrays(self.store), subset=False)
        assert TileStore(self.store, mode="r").verify().ok
        left = _leftovers(self.slurm)
        assert left == [], f"left behind: {left}"
        self.say("store identical to the clean run, verify clean, nothing left running")

    def _strike(self, proc: subprocess.Popen, after: int, delay: float) -> str | None:
        # the run is other processes: its store and workers are polled with a deadline
        wait_until(lambda: proc.poll() is not None or (
            _n_complete(self.store) >= after and self._ready()), 180,
            "progress before the strike", interval=0.1)
        if proc.poll() is not None:
            self.say("the run ended before the strike")
            return None
        time.sleep(delay)  # not synchronisation: the random moment of the strike
        n = _n_complete(self.store)
        if proc.poll() is not None:
            self.say("the run ended before the strike")
            return None
        if self.kind == "worker":
            pids = _worker_processes()
            victim = self.rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            self.say(f"SIGKILL worker process {victim} (of {pids}) at {n} slides complete")
        elif self.kind == "all-workers":
            pids = _worker_processes()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            self.say(f"SIGKILL all worker processes {pids} at {n} slides complete")
        elif self.kind == "scheduler":
            self._sched.kill()
            self.say(f"SIGKILL the dask scheduler (pid {self._sched.pid}) at {n} slides complete")
        elif self.kind == "driver":
            proc.kill()
            self.say(f"SIGKILL the driver (pid {proc.pid}) at {n} slides complete")
        elif self.kind == "scancel":
            jobs = [j for j, name, st in self.slurm.jobs()
                    if name.startswith("wsi-ssl-") and st == "RUNNING"]
            victim = self.rng.choice(jobs)
            self.slurm.run("scancel", victim)
            self.say(f"scancel worker job {victim} (of {jobs}) at {n} slides complete")
        return self.kind

    def _ready(self) -> bool:
        """Something to strike is up: the workers (or, for the driver, the jobs) exist."""
        if self.kind in ("worker", "all-workers"):
            return len(_worker_processes()) >= 2
        if self.kind == "scancel":
            return sum(st == "RUNNING" and n.startswith("wsi-ssl-")
                       for _, n, st in self.slurm.jobs()) >= 2
        return True

    def _check_arrays(self, got: dict, *, subset: bool) -> None:
        if not subset:
            assert sorted(got) == sorted(self.ref), (sorted(got), sorted(self.ref))
        for sid, arrays in got.items():
            assert sid in self.ref, sid
            for name, a, b in zip(("features", "coords", "views", "view_index"), arrays,
                                  self.ref[sid], strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{sid}.{name}")


def test_chaos(slurm, tmp_path):
    """``slurm``: the session's test Slurm cluster (tests/conftest.py)."""
    budget = float(os.environ.get("WSI_SSL_CHAOS_BUDGET_S", "300"))
    rounds = int(os.environ.get("WSI_SSL_CHAOS_ROUNDS", "10"))
    base = int(os.environ.get("WSI_SSL_CHAOS_SEED", "1000"))
    t_start = time.monotonic()
    cohort = make_cohort(tmp_path / "cohort", N_SLIDES)
    rep = embed_slides(cohort, "tiny-cnn", tmp_path / "ref.zarr", client="sync", **EMBED_KW)
    assert rep.ok and len(rep.done) == N_SLIDES
    ref = store_arrays(tmp_path / "ref.zarr")
    print(f"\nchaos: clean in-process reference of {N_SLIDES} slides in "
          f"{time.monotonic() - t_start:.1f} s; up to {rounds} rounds in {budget:.0f} s")
    done: list[float] = []
    for r in range(rounds):
        elapsed = time.monotonic() - t_start
        longest = max(done, default=0.0)
        if r and elapsed + longest > budget:
            print(f"chaos: stopping after {r} of {rounds} rounds: the next could pass the "
                  f"{budget:.0f} s budget ({elapsed:.0f} s used, longest round {longest:.0f} s)")
            break
        seed = base + r
        rd = Round(slurm, cohort, ref, tmp_path, r, seed)
        t0 = time.monotonic()
        try:
            rd.run()
        except BaseException as err:
            print("\n".join(f"  {line}" for line in rd.log))
            raise AssertionError(
                f"chaos round {r} (seed {seed}, kill {rd.kind}) failed: {err}; replay it with "
                f"WSI_SSL_CHAOS_SEED={seed} WSI_SSL_CHAOS_ROUNDS=1 python -m pytest -m chaos "
                "tests/test_chaos.py") from err
        finally:
            rd._stop_hand_started()
        done.append(time.monotonic() - t0)
        print(f"round {r} seed {seed} kill {rd.kind}: ok in {done[-1]:.1f} s")
        print("\n".join(f"  {line}" for line in rd.log))
    print(f"chaos: {len(done)} rounds passed in {time.monotonic() - t_start:.0f} s")
    assert done
