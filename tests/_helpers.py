"""Helpers shared by the test folders (imported as ``tests._helpers``; ``tests`` is a package).

- :func:`wait_until`: poll a condition with a deadline, for waits across a process boundary
  (a file another process writes, a daemon's state), failing with a message naming what was
  awaited. Inside one process, use events, conditions or ``join`` instead.
- :func:`wait_for_line`: block on a child process's stdout pipe (an event, not polling) until it
  prints a given line, with a deadline.
- :func:`assert_same_store`: two tile stores hold the same slides, array for array.
- :func:`dice`: overlap of two boolean masks.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def poll_until(predicate: Callable[[], T], timeout: float, *, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy or
    ``timeout`` seconds have passed; return its last value (falsy on timeout). Exceptions from
    ``predicate`` propagate (a predicate may raise to stop early, e.g. when a process exited)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def wait_until(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str], *,
               interval: float = 0.05, error: type[Exception] = AssertionError) -> T:
    """Like :func:`poll_until`, but a timeout raises ``error`` with the message
    ``timed out after <timeout> s waiting for <what>`` (``what`` may be a callable, evaluated only
    then, to add logs or state to the message). Returns the predicate's truthy value."""
    value = poll_until(predicate, timeout, interval=interval)
    if not value:
        text = what() if callable(what) else what
        raise error(f"timed out after {timeout:g} s waiting for {text}")
    return value


def wait_for_line(proc: subprocess.Popen, line: str, timeout: float) -> list[str]:
    """Read ``proc``'s stdout (a pipe, text or bytes) until a line equal to ``line`` (stripped)
    arrives; return the lines read. Fails with the process's stderr when it exits first, and after
    ``timeout`` seconds. Reads the raw pipe (``os.read``), so nothing is left in a Python buffer
    that a later ``communicate`` would miss."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf, lines = b"", []
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise AssertionError(f"timed out after {timeout:g} s waiting for {line!r} from "
                                     f"pid {proc.pid}; it printed {lines[-5:]}")
            if not sel.select(left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # EOF: the process closed stdout (it exited)
                err = _stderr_tail(proc)
                raise AssertionError(f"pid {proc.pid} exited (rc={proc.wait(30)}) before "
                                     f"printing {line!r}; it printed {lines[-5:]}; stderr: {err}")
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [d.decode(errors="replace").strip() for d in done]
            if line in lines:
                return lines


def _stderr_tail(proc: subprocess.Popen) -> str:
    if proc.stderr is None:
        return "(not captured)"
    try:
        proc.wait(30)
        err = proc.stderr.read()
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return "(unreadable)"
    if isinstance(err, bytes):
        err = err.decode(errors="replace")
    return err[-2000:]


def assert_same_store(a: Any, b: Any) -> None:
    """Two open :class:`~wsi_ssl.store.TileStore` hold the same slides from the same encoder,
    array for array, with the same per-slide attributes."""
    assert a.slide_ids == b.slide_ids and a.encoder == b.encoder, (a.slide_ids, b.slide_ids)
    for sid in a.slide_ids:
        ra, rb = a[sid], b[sid]
        for name in ("features", "coords", "views", "view_index"):
            np.testing.assert_array_equal(getattr(ra, name), getattr(rb, name),
                                          err_msg=f"{sid}.{name}")
        assert ra.attrs == rb.attrs, sid


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (0 when both are empty)."""
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))
