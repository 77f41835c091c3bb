"""The writer lock of a tile store: one writer at a time, across processes and hosts.

``STORE/.lock`` is a :class:`filelock.SoftFileLease`: a marker file created with ``O_EXCL`` (atomic
on local filesystems and on NFSv3+, Lustre, GPFS, CephFS, SMB) that holds the owner's host, PID
and a claim token, and whose modification time a heartbeat thread refreshes every third of the
lease while the holder lives. A lock whose holder is gone is *stale*:

* on the holder's own host (same host name, PID no longer alive) at once;
* anywhere else once a contender has watched the marker go unrefreshed for a whole lease
  (measured on the contender's own monotonic clock, so clock skew between hosts does not matter).

A stale lock is taken over with a logged warning naming the previous holder, never silently.
``STORE/.lock.json`` beside it holds what a person needs to know about the holder (host, PID,
command, since when, run or single call). Readers never take the lock.

The lease (default 30 s) must be the same for every process using a store; tests shorten it with
the ``WSI_SSL_LOCK_LEASE`` environment variable (seconds).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl.errors import ConfigError, StoreLockedError

__all__ = ["StoreLock", "LockHolder", "StoreLockedError", "LOCK_NAME", "lock_lease_seconds"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_INFO_SUFFIX = ".json"
_DEFAULT_LEASE = 30.0


def lock_lease_seconds() -> float:
    """The lease of store locks: ``$WSI_SSL_LOCK_LEASE`` seconds, default 30."""
    raw = os.environ.get("WSI_SSL_LOCK_LEASE", "").strip()
    if not raw:
        return _DEFAULT_LEASE
    try:
        val = float(raw)
    except ValueError as err:
        raise ConfigError(f"WSI_SSL_LOCK_LEASE={raw!r} must be a number of seconds.") from err
    if not 0 < val < 1e6:
        raise ConfigError(f"WSI_SSL_LOCK_LEASE={raw!r} must be > 0 seconds.")
    return val


@dataclass(frozen=True, kw_only=True)
class LockHolder:
    """Who holds (or last held) a store's lock.

    Attributes:
        host, pid: where the holding process runs.
        command: its command line (or what the caller said it is); "" when unknown.
        since: ISO-8601 UTC time it took the lock; "" when unknown.
        scope: ``"run"`` (a whole embed/import/cleanup), ``"call"`` (one write), or
            ``"unknown"`` (``.lock.json`` not written yet or left by an earlier holder).
        heartbeat_age: seconds since the marker was last refreshed (by this host's clock).
    """

    host: str
    pid: int
    command: str = ""
    since: str = ""
    scope: str = "run"
    heartbeat_age: float | None = None

    def describe(self) -> str:
        parts = [f"host {self.host}, PID {self.pid}"]
        if self.command:
            parts.append(f"command {self.command!r}")
        if self.since:
            parts.append(f"since {self.since}")
        if self.heartbeat_age is not None:
            parts.append(f"last heartbeat {self.heartbeat_age:.0f} s ago")
        return "; ".join(parts)


def _parse_marker(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, val = line.partition("=")
        if sep:
            out[key.strip()] = val.strip()
    return out


class StoreLock:
    """The exclusive writer lock of one store directory (see the module docstring).

    Reentrant within a process: every :class:`StoreLock` of the same store in one process shares
    one hold (a counter), so a run holding the lock may call single writes that take it again.

    Args:
        store_path: the store directory (must exist).
        lease: seconds after which an unrefreshed lock is stale (default
            :func:`lock_lease_seconds`); every process of a store must use the same value.
    """

    def __init__(self, store_path: str | os.PathLike, *, lease: float | None = None) -> None:
        from filelock import SoftFileLease  # lazy: filelock only when a store is locked

        self.store_path = Path(store_path).absolute()
        self.path = self.store_path / LOCK_NAME
        self.info_path = self.store_path / (LOCK_NAME + _INFO_SUFFIX)
        self.lease = float(lease) if lease is not None else lock_lease_seconds()
        self._lease = SoftFileLease(str(self.path), lease_duration=self.lease,
                                    is_singleton=True, thread_local=False,
                                    poll_interval=min(0.05, self.lease / 10))

    # -- state ---------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        """True while this process holds the lock."""
        return bool(self._lease.is_locked)

    def _marker(self) -> tuple[dict[str, str], float] | None:
        try:
            st = os.stat(self.path)
            text = self.path.read_text(errors="replace")
        except OSError:
            return None
        return _parse_marker(text), st.st_mtime

    def holder(self) -> LockHolder | None:
        """The current holder (None when the lock is free), from the marker and ``.lock.json``."""
        marker = self._marker()
        if marker is None:
            return None
        fields, mtime = marker
        info = self._read_info() or {}
        same = info.get("token") is not None and info.get("token") == fields.get("token")
        try:
            pid = int(fields.get("pid", info.get("pid", 0)))
        except ValueError:
            pid = 0
        return LockHolder(host=fields.get("host", info.get("host", "?")), pid=pid,
                          command=str(info.get("command", "")) if same else "",
                          since=str(info.get("since", "")) if same else "",
                          scope=str(info.get("scope", "unknown")) if same else "unknown",
                          heartbeat_age=max(0.0, time.time() - mtime))

    def _read_info(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # -- acquire / release ---------------------------------------------------------------------
    def acquire(self, *, wait: bool | float = False, command: str | None = None,
                scope: Literal["run", "call"] = "run") -> None:
        """Take the lock.

        Args:
            wait: ``False`` fails at once when another process holds it (unless its lock looks
                stale: then this watches it for one lease and takes it over); ``True`` waits as
                long as needed; a number waits at most that many seconds.
            command: what to show other writers (default: this process's command line).
            scope: ``"run"`` for a whole job, ``"call"`` for one short write.

        Raises:
            StoreLockedError: naming the store, the holder and what to do.
        """
        from filelock import (  # lazy: filelock only when a store is locked
            LeaseSettingsMismatch,
            Timeout,
        )

        if self.held:  # reentrant: same process
            self._lease.acquire()
            return
        timeout = 0.0 if wait is False else (-1.0 if wait is True else max(0.0, float(wait)))
        try:
            self._lease.acquire(timeout=timeout)
        except LeaseSettingsMismatch as err:
            raise ConfigError(f"the lock of tile store '{self.store_path}' uses another lease than "
                              f"this process ({self.lease:g} s): {err}. Give every process of a "
                              "store the same WSI_SSL_LOCK_LEASE.") from err
        except Timeout:
            holder = self.holder()
            looks_stale = holder is not None and (holder.heartbeat_age or 0) > self.lease
            if wait is True or not looks_stale:
                raise self._locked_error(holder) from None
            logger.warning("the lock of tile store '%s' looks stale (%s); watching it for %.0f s "
                           "before taking it over", self.store_path, holder.describe(), self.lease)
            try:
                self._lease.acquire(timeout=self.lease * 1.5 + 1.0)
            except Timeout:
                raise self._locked_error(self.holder()) from None
        try:
            self._after_acquire(command, scope)
        except BaseException:
            self._lease.release()
            raise

    def acquire_for_call(self, timeout: float) -> None:
        """Take the lock for one short write: join this process's hold if it has one; else wait
        behind other single writes (at most ``timeout`` seconds) but fail at once behind a run."""
        if self.held:
            self._lease.acquire()
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.acquire(wait=min(1.0, max(0.0, deadline - time.monotonic())), scope="call")
                return
            except StoreLockedError:
                # fail at once only behind a known run; a holder whose .lock.json is not
                # written yet (it just took the lock) is waited for like a single write
                holder = self.holder()
                if holder is not None and holder.scope == "run" or time.monotonic() >= deadline:
                    raise

    def _after_acquire(self, command: str | None, scope: str) -> None:
        old = self._read_info()
        if old is not None and old.get("token") != self._lease.token:
            # the previous holder never released (a normal release deletes .lock.json)
            prev = LockHolder(host=str(old.get("host", "?")), pid=int(old.get("pid", 0) or 0),
                              command=str(old.get("command", "")), since=str(old.get("since", "")),
                              scope=str(old.get("scope", "run")))
            logger.warning("took over the stale lock of tile store '%s' left by %s (it stopped "
                           "refreshing its lease)", self.store_path, prev.describe())
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "command": command if command is not None else " ".join(sys.argv),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "scope": scope, "token": self._lease.token, "lease_seconds": self.lease}
        atomic_write_bytes(self.info_path, json.dumps(info).encode(), fsync=False)

    def release(self) -> None:
        """Give one hold back; the last one removes ``.lock.json`` and the marker."""
        if not self.held:
            return
        if self._lease.lock_counter <= 1:
            info = self._read_info()
            if info is not None and info.get("token") == self._lease.token:
                try:
                    self.info_path.unlink()
                except OSError:
                    pass
        self._lease.release()

    def check(self) -> None:
        """Raise :class:`StoreLockedError` unless this process still holds the lock (a writer
        that stalled for longer than a lease may have been taken over; it must not write)."""
        if not self.held:
            raise StoreLockedError(f"this process does not hold the lock of tile store "
                                   f"'{self.store_path}'; take it with TileStore.lock().")
        marker = self._marker()
        token = self._lease.token
        if marker is None or marker[0].get("token") != token:
            holder = self.holder()
            raise StoreLockedError(
                f"lost the lock of tile store '{self.store_path}' to "
                f"{holder.describe() if holder else 'another writer'} (this process stopped "
                f"refreshing its {self.lease:g} s lease); stopping without writing. Rerun the "
                "command when the other writer is done.")

    def _locked_error(self, holder: LockHolder | None) -> StoreLockedError:
        who = holder.describe() if holder else "another writer (it just released it)"
        return StoreLockedError(
            f"tile store '{self.store_path}' is locked by another writer ({who}); wait for it "
            "to finish or rerun with --wait (wait=True) to queue behind it. A crashed writer's "
            f"lock is taken over automatically once its {self.lease:g} s lease runs out.")

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
