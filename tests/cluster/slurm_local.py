"""A real single-node Slurm cluster on this machine, for the tests (no mock of ``sbatch``).

``LocalSlurm(tmpdir).start()`` writes a munge key and a minimal ``slurm.conf`` into ``tmpdir``,
starts ``munged``, ``slurmctld`` and ``slurmd`` (as root, in the foreground of child processes
this object owns), and waits until ``sinfo`` shows the node idle. ``env()`` is the environment
every Slurm command and every process that submits jobs must get (``SLURM_CONF``). ``stop()``
cancels every job and stops the daemons. Needs ``apt-get install slurm-wlm munge`` and root
(``SlurmdUser=root``); :class:`SlurmUnavailable` carries the daemon's own error otherwise.

Also a script: ``python -m tests.cluster.slurm_local`` (from the checkout) starts one, prints ``SLURM_CONF`` and
waits for Ctrl-C (handy to try ``wsi-ssl embed --cluster slurm`` by hand).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests._helpers import poll_until, wait_until

__all__ = ["LocalSlurm", "SlurmUnavailable", "slurm_jobs", "NODE_CPUS"]

NODE_CPUS = 4  # declared (config_overrides): up to 4 one-core jobs at once on the 2-core box


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM when the process that started it dies (Linux
    PR_SET_PDEATHSIG), so a test run killed by a timeout leaves no Slurm daemons behind."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SlurmUnavailable(RuntimeError):
    """The daemons cannot run here; the message is their own error."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 6) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


class LocalSlurm:
    """One controller + one node named ``wsinode`` (``NODE_CPUS`` CPUs), state in ``root``."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's) with ``SLURM_CONF`` and ``SBATCH_OUTPUT`` (jobs
        that name no output file write into ``root/jobs``, never into the submit folder)."""
        env = dict(os.environ if base is None else base)
        env.update(self.env_vars())
        return env

    def env_vars(self) -> dict[str, str]:
        (self.root / "jobs").mkdir(exist_ok=True)
        return {"SLURM_CONF": str(self.conf),
                "SBATCH_OUTPUT": str(self.root / "jobs" / "slurm-%j.out")}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        out = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): "
                               f"{out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> LocalSlurm:
        for exe in ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel"):
            if shutil.which(exe) is None:
                raise SlurmUnavailable(f"'{exe}' is not installed (apt-get install slurm-wlm "
                                       "munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailable("the test Slurm runs slurmd as root; this is uid "
                                   f"{os.geteuid()}")
        try:
            self._start_munge()
            self._write_conf()
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        mdir = self.munge_socket.parent
        mdir.mkdir(parents=True, exist_ok=True)
        os.chmod(mdir, 0o700)
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        log = mdir / "munged.log"
        cmd = ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
               f"--key-file={key}", f"--pid-file={mdir / 'munged.pid'}",
               f"--log-file={log}", f"--seed-file={mdir / 'munged.seed'}"]
        self._procs["munged"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                 stderr=open(mdir / "munged.err", "w"),
                                                 start_new_session=True,
                                                 preexec_fn=_die_with_parent)
        # another process: its socket file is polled with a deadline
        wait_until(lambda: self.munge_socket.exists() or self._procs["munged"].poll() is not None,
                   15, lambda: "munged: " + _tail(mdir / "munged.err") + " " + _tail(log),
                   interval=0.1, error=SlurmUnavailable)
        if not self.munge_socket.exists():
            raise SlurmUnavailable("munged did not start: "
                                   + _tail(mdir / "munged.err") + " " + _tail(log))

    def _write_conf(self) -> None:
        for d in ("state", "spool", "log", "run"):
            (self.root / d).mkdir(exist_ok=True)
        host = socket.gethostname().split(".")[0]
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=wsissl",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "SchedulerType=sched/builtin",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "KillWait=2",
            "MinJobAge=2",
            "InactiveLimit=0",
            "MessageTimeout=10",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "MailProg=/bin/true",
            f"NodeName=wsinode NodeHostname={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} "
            "RealMemory=16000 State=UNKNOWN",
            "PartitionName=debug Nodes=wsinode Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_slurm(self, timeout: float) -> None:
        logs = self.root / "log"
        self._procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)], env=self.env(),
            stdout=subprocess.DEVNULL, stderr=open(logs / "slurmctld.err", "w"),
            start_new_session=True, preexec_fn=_die_with_parent)
        self._procs["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", "wsinode", "-f", str(self.conf)], env=self.env(),
            stdout=subprocess.DEVNULL, stderr=open(logs / "slurmd.err", "w"),
            start_new_session=True, preexec_fn=_die_with_parent)
        state = [""]

        def node_up() -> bool:
            for name in ("slurmctld", "slurmd"):
                if self._procs[name].poll() is not None:
                    raise SlurmUnavailable(
                        f"{name} exited ({self._procs[name].returncode}): "
                        + _tail(logs / f"{name}.err") + " " + _tail(logs / f"{name}.log"))
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env(),
                                 capture_output=True, text=True, timeout=30)
            state[0] = (out.stdout.strip() or out.stderr.strip())
            return out.returncode == 0 and state[0] in ("idle", "mixed", "allocated")

        # other processes (the daemons): sinfo is polled with a deadline
        wait_until(node_up, timeout, lambda: f"the Slurm node to be idle (sinfo: {state[0]!r}): "
                   + _tail(logs / "slurmd.log") + " " + _tail(logs / "slurmctld.log"),
                   interval=0.3, error=SlurmUnavailable)

    def cancel_all(self) -> None:
        if self.conf.exists() and "slurmctld" in self._procs:
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env(),
                           capture_output=True, timeout=30)

    def stop(self) -> None:
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def jobs(self) -> list[tuple[str, str, str]]:
        """``(job id, name, state)`` of every job Slurm still knows as pending/running."""
        return slurm_jobs(self.env())

    def wait_no_jobs(self, timeout: float = 30) -> list[tuple[str, str, str]]:
        """Poll ``squeue`` until it lists nothing (or ``timeout``); return what is left."""
        poll_until(lambda: not self.jobs(), timeout, interval=0.3)
        return self.jobs()


def slurm_jobs(env: dict[str, str]) -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i|%j|%T"], env=env, capture_output=True,
                         text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"squeue failed: {out.stderr.strip()}")
    return [tuple(line.split("|", 2)) for line in out.stdout.strip().splitlines() if line]


if __name__ == "__main__":  # pragma: no cover - manual use
    import tempfile

    root = tempfile.mkdtemp(prefix="wsi-slurm-")
    s = LocalSlurm(root).start()
    print(f"export SLURM_CONF={s.conf}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        s.stop()
