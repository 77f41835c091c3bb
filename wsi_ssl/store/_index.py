"""The slide index: which slides of a store are complete, in one file read.

``STORE/slides.index`` is an append-only log of JSON lines: a header
``{"format": "wsi-ssl-slide-index", "version": 1}``, then ``{"+": id, "n_tiles", "n_views",
"view_tiles", "dim", "bytes"}`` after each commit and ``{"-": id}`` after each deletion. Only a lock
holder appends (after the rename that commits the slide, so an entry never precedes its slide) and
compacts it (rewritten through a temporary file and a rename when it holds more than twice as many
lines as slides).

Readers never trust it alone: a listing is the index reconciled with one directory listing of
``slides/`` (names only, no per-slide reads): an entry whose folder is gone is dropped, a folder
without an entry (a writer killed between its commit and its index line, an index deleted or
restored from a backup) is read and checked like the directory scan does. So the listing is
always exactly the complete slides, at the cost of one file read and one directory listing plus
one metadata read per mismatch. ``TileStore.rescan()`` (``wsi-ssl info --rescan``) rebuilds it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from wsi_ssl._utils import atomic_write_bytes

__all__ = ["SlideIndex", "INDEX_NAME"]

INDEX_NAME = "slides.index"
_HEADER = {"format": "wsi-ssl-slide-index", "version": 1}
_FIELDS = ("n_tiles", "n_views", "view_tiles", "dim", "bytes")


class SlideIndex:
    """Read, append to and rewrite ``STORE/slides.index`` (see the module docstring)."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(store_path) / INDEX_NAME
        self._mutex = threading.Lock()
        self._cache: tuple[tuple[int, int, int], dict[str, dict[str, Any]], int] | None = None

    def load(self) -> tuple[dict[str, dict[str, Any]], int] | None:
        """``({slide_id: entry}, number of lines)``, or ``None`` when missing or unreadable."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._mutex:
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1], self._cache[2]
        try:
            text = self.path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        # the last piece is "" after a final newline, else a torn line (a writer killed
        # mid-append), which is not an entry
        lines = text.split("\n")[:-1]
        try:
            head = json.loads(lines[0]) if lines else None
        except ValueError:
            return None
        if head != _HEADER:
            return None
        entries: dict[str, dict[str, Any]] = {}
        for line in lines[1:]:
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn append (later appends start on a new line): no entry; the
                # folder listing the index is reconciled with covers what it said
            if not isinstance(rec, dict):
                continue
            if "+" in rec:
                entries[str(rec["+"])] = {k: rec.get(k) for k in _FIELDS}
            elif "-" in rec:
                entries.pop(str(rec["-"]), None)
        with self._mutex:
            self._cache = (key, entries, len(lines))
        return entries, len(lines)

    def append(self, added: dict[str, dict[str, Any]] | None = None,
               removed: list[str] | None = None) -> None:
        """Append entries (the caller holds the store's lock); compacts when it has grown."""
        loaded = self.load()
        if loaded is None:
            return  # no trustworthy index: the directory scan is the truth until a rescan
        lines = []
        for sid in removed or ():
            lines.append(json.dumps({"-": sid}))
        for sid, entry in (added or {}).items():
            lines.append(json.dumps({"+": sid, **{k: entry.get(k) for k in _FIELDS}}))
        if not lines:
            return
        entries, n_lines = loaded
        new = dict(entries)  # a C-level copy; readers may be iterating the cached one
        for sid in removed or ():
            new.pop(sid, None)
        new.update({sid: {k: e.get(k) for k in _FIELDS} for sid, e in (added or {}).items()})
        if n_lines + len(lines) > 2 * len(new) + 64:
            self.rewrite(new)
            return
        data = ("\n".join(lines) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            torn = bool(size) and os.pread(fd, 1, size - 1) != b"\n"
            if torn:
                data = b"\n" + data  # after a torn line
            os.write(fd, data)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not torn:  # the parsed index stays valid: no re-read of the whole file per commit
            with self._mutex:
                self._cache = ((st.st_ino, st.st_size, st.st_mtime_ns), new,
                               n_lines + len(lines))

    def rewrite(self, entries: dict[str, dict[str, Any]]) -> None:
        """Replace the index with ``entries`` (atomically; the caller holds the store's lock)."""
        lines = [json.dumps(_HEADER)]
        lines += [json.dumps({"+": sid, **{k: e.get(k) for k in _FIELDS}})
                  for sid, e in sorted(entries.items())]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode(), fsync=False)
        try:
            st = os.stat(self.path)
        except OSError:
            return
        with self._mutex:
            self._cache = ((st.st_ino, st.st_size, st.st_mtime_ns), dict(entries), len(lines))

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
