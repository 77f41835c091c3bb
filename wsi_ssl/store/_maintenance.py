"""Store maintenance over many slides: cleanup of provable garbage, and verify.

Kept out of ``_tilestore`` (the format and single-slide I/O); both work on a :class:`TileStore`
and are reached through :meth:`TileStore.cleanup` / :meth:`TileStore.verify`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from wsi_ssl._utils import progress as bar_of
from wsi_ssl.store._integrity import RepairPlan, VerifyReport, check_slide

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store._tilestore import TileStore

__all__ = ["cleanup_store", "verify_store", "find_damaged"]

logger = logging.getLogger(__name__)


def cleanup_store(store: TileStore) -> int:
    """See :meth:`TileStore.cleanup`; runs under the store's lock."""
    removed = 0
    with store._locked() as lock:
        lock.check()
        tmp = store.path / ".tmp"
        if tmp.is_dir():
            for d in tmp.iterdir():
                logger.info("cleanup: removing abandoned temporary entry '%s'", d)
                if d.is_dir():
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    d.unlink(missing_ok=True)
                removed += 1
        complete, unreadable, incomplete, agreed = store._listing()
        for sid in incomplete:
            logger.info("cleanup: removing incomplete slide group '%s'", sid)
            shutil.rmtree(store._slide_dir(sid), ignore_errors=True)
            removed += 1
        for sid, why in unreadable.items():
            logger.warning("cleanup: slide '%s' of '%s' is unreadable (%s); left in place.",
                           sid, store.path, why)
        if not agreed:
            logger.info("cleanup: slide index of '%s' rebuilt (%d slides)", store.path,
                        len(complete))
            store._index.rewrite(complete)
    return removed


def _threads(threads: int | None) -> int:
    if threads is None:
        return max(1, min(4, os.cpu_count() or 1))
    return max(1, int(threads))


def verify_store(store: TileStore, slide_ids: Sequence[str] | None = None, *,
                 threads: int | None = None, progress: bool | None = None) -> VerifyReport:
    """See :meth:`TileStore.verify`; reads only, never locks. Slides are hashed in ``threads``
    threads (zarr decoding and SHA-256 release the GIL)."""
    complete, unreadable, _, _ = store._listing(full=slide_ids is None)
    ids = list(complete)
    if slide_ids is not None:
        want = list(dict.fromkeys(str(s) for s in slide_ids))
        known = set(ids)
        for sid in want:  # asked for, outside the index: read it like the scan does
            if sid not in known and sid not in unreadable:
                state, info = store._probe(sid) if store._slide_dir(sid).is_dir() else ("", "")
                if state == "complete":
                    known.add(sid)
                elif state == "unreadable":
                    unreadable[sid] = str(info)
        ids = [s for s in want if s in known]
        unreadable = {s: r for s, r in unreadable.items() if s in set(want)}

    def one(sid: str) -> tuple[str, dict[str, Any] | None, list[str] | None]:
        attrs = store.slide_attrs(sid)
        if attrs is None:
            return sid, None, None
        if not attrs.get("checksums"):
            return sid, attrs, None
        return sid, attrs, check_slide(store, sid, attrs)

    damaged: dict[str, str] = {}
    checked, unchecked = [], []
    first_attrs: dict[str, Any] = {}
    bar = bar_of(total=len(ids), desc="verify", unit="slide",
                 disable=None if progress is None else not progress)
    try:
        with ThreadPoolExecutor(_threads(threads)) as pool:
            for sid, attrs, problems in pool.map(one, ids):
                bar.update(1)
                if attrs is None:
                    unreadable[sid] = "zarr.json cannot be read"
                elif problems is None:
                    unchecked.append(sid)
                else:
                    checked.append(sid)
                    if problems:
                        damaged[sid] = "; ".join(problems)
                        first_attrs = first_attrs or attrs
    finally:
        bar.close()
    plan = RepairPlan.from_attrs(store.path, list(damaged), first_attrs) if damaged else None
    return VerifyReport(store=store.path, checked=tuple(checked), damaged=damaged,
                        unreadable=unreadable, unchecked=tuple(unchecked), repair=plan)


def find_damaged(store: TileStore, slide_ids: Sequence[str] | None = None, *,
                 threads: int | None = None) -> VerifyReport:
    """The damaged slides among ``slide_ids`` (all when None), found without the writer lock:
    what ``embed --repair`` calls before it takes the lock to re-embed them. Same as
    :meth:`TileStore.verify`; a slide damaged again meanwhile is found by the next verify."""
    return verify_store(store, slide_ids, threads=threads, progress=None)
