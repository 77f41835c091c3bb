"""The store's writer lock with real processes: a second writer is stopped (naming the holder) or
queues, a stalled holder's lease expires and is taken over (logged) and the stalled holder then
refuses to commit, and two processes hammering one store lose no update."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests._helpers import wait_until
from wsi_ssl.cli import main
from wsi_ssl.store import StoreLockedError, TileStore

_HOLDER = """
import sys
import numpy as np
from wsi_ssl.store import TileStore, StoreLockedError
store = TileStore(sys.argv[1])
store.bind_encoder("enc", "fp", 4)
with store.lock(command="holder-run"):
    print("HELD", flush=True)
    sys.stdin.readline()  # blocks until the test says "go" (or closes the pipe)
    try:
        store.write_slide("late", np.ones((3, 4)), np.zeros((3, 2)))
        print("WROTE", flush=True)
    except StoreLockedError as err:
        print("LOST", err, flush=True)
"""

_HAMMER = """
import sys
import numpy as np
from wsi_ssl.store import TileStore
tag, path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(len(tag))
store = TileStore(path)          # both processes may create the store at the same moment
store.bind_encoder("enc", "fp", 4)
for i in range(12):
    store.write_slide(f"{tag}{i}", rng.normal(size=(5, 4)), np.zeros((5, 2)))
    store.write_slide("shared", rng.normal(size=(5, 4)), np.zeros((5, 2)))
    store.record_failure(f"fail-{tag}{i}", f"/x/{tag}{i}.svs", "boom")
print("OK", flush=True)
"""


def _env(lease: float | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if lease is not None:
        env["WSI_SSL_LOCK_LEASE"] = str(lease)
    return env


class _Go:
    """Tells the holder process to go on: one line on its stdin (a pipe, no polling)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def send(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()


def _start_holder(tmp_path: Path, store: Path, lease: float | None = None):
    script = tmp_path / "holder.py"
    script.write_text(textwrap.dedent(_HOLDER))
    proc = subprocess.Popen([sys.executable, str(script), str(store)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(lease))
    assert proc.stdout.readline().strip() == "HELD", proc.stderr.read()
    return proc, _Go(proc)


def test_second_writer_fails_at_once_naming_the_holder_and_wait_queues(tmp_path, capsys):
    path = tmp_path / "s.zarr"
    proc, go = _start_holder(tmp_path, path)
    try:
        store = TileStore(path)  # opening and reading never lock
        assert store.slide_ids == [] and store.encoder["name"] == "enc"
        holder = rf"host {socket.gethostname()}, PID {proc.pid}; command 'holder-run'; since "
        with pytest.raises(StoreLockedError, match=rf"'.*s\.zarr' is locked by .*{holder}"):
            with store.lock():
                pass
        # a single write behind a whole run fails at once too, and writes nothing
        with pytest.raises(StoreLockedError, match=f"PID {proc.pid}"):
            store.write_slide("x", np.ones((2, 4)), np.zeros((2, 2)))
        with pytest.raises(StoreLockedError, match="rerun with --wait"):
            store.record_failure("x", "/x.svs", "err")
        assert store.writer.pid == proc.pid and store.writer.command == "holder-run"
        assert main(["info", str(path)]) == 0  # readers never wait for the lock
        assert f"writer         host {socket.gethostname()}, PID {proc.pid}; command " \
               "'holder-run'" in capsys.readouterr().out
        assert store.failures == {} and "x" not in store
        assert not any((path / ".tmp").glob("x.*"))
        go.send()  # the holder writes its slide and releases; wait=True queues behind it
        with store.lock(wait=True):
            assert "late" in store
            store.write_slide("mine", np.ones((2, 4)), np.zeros((2, 2)))
        assert proc.wait(60) == 0 and proc.stdout.read().strip() == "WROTE"
    finally:
        proc.kill()
    assert TileStore(path, mode="r").slide_ids == ["late", "mine"]
    assert not (path / ".lock").exists() and not (path / ".lock.json").exists()
    assert TileStore(path, mode="r").writer is None


def test_stalled_holder_is_taken_over_after_its_lease_and_cannot_commit(tmp_path, monkeypatch,
                                                                         caplog):
    lease = 1.0
    monkeypatch.setenv("WSI_SSL_LOCK_LEASE", str(lease))
    path = tmp_path / "s.zarr"
    proc, go = _start_holder(tmp_path, path, lease=lease)
    try:
        os.kill(proc.pid, signal.SIGSTOP)  # alive (PID exists) but no longer refreshing
        store = TileStore(path)
        # the stopped process's heartbeat ages on the file system: polled with a deadline
        wait_until(lambda: (store.writer.heartbeat_age or 0) > lease * 1.2, 30,
                   lambda: f"the lease to run out (holder: {store.writer})")
        with caplog.at_level(logging.WARNING, logger="wsi_ssl.store._lock"):
            with store.lock():
                assert "looks stale" in caplog.text
                assert f"took over the stale lock of tile store '{path.absolute()}' left by " \
                       f"host {socket.gethostname()}, PID {proc.pid}; command 'holder-run'" \
                       in caplog.text
                os.kill(proc.pid, signal.SIGCONT)
                go.send()
                out = proc.stdout.readline()
                # the woken holder sees it lost the lock and does not write
                assert out.startswith("LOST lost the lock of tile store"), out
                assert f"PID {os.getpid()}" in out
                assert "late" not in store
                store.write_slide("mine", np.ones((2, 4)), np.zeros((2, 2)))
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
    assert TileStore(path, mode="r").slide_ids == ["mine"]


def test_two_processes_hammering_one_new_store_lose_nothing(tmp_path):
    path = tmp_path / "new.zarr"
    script = tmp_path / "hammer.py"
    script.write_text(textwrap.dedent(_HAMMER))
    procs = [subprocess.Popen([sys.executable, str(script), tag, str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.strip() == "OK", err[-2000:]
    store = TileStore(path, mode="r")
    want = {f"{t}{i}" for t in "ab" for i in range(12)}
    assert set(store.slide_ids) == want | {"shared"}
    assert set(store.failures) == {f"fail-{s}" for s in want}  # no lost read-modify-write
    assert store.verify().ok and len(store.verify().checked) == 25
    assert not list((path / ".tmp").iterdir())
