"""Store maintenance over many slides: cleanup of provable garbage, and verify.

Kept out of ``_tilestore`` (the format and single-slide I/O); both work on a :class:`TileStore`
and are reached through :meth:`TileStore.cleanup` / :meth:`TileStore.verify`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from wsi_ssl.store._integrity import VerifyReport, check_slide, repair_command

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store._tilestore import TileStore

__all__ = ["cleanup_store", "verify_store"]

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
        _, unreadable, incomplete = store._scan()
        for sid in incomplete:
            logger.info("cleanup: removing incomplete slide group '%s'", sid)
            shutil.rmtree(store._slide_dir(sid), ignore_errors=True)
            removed += 1
        for sid, why in unreadable.items():
            logger.warning("cleanup: slide '%s' of '%s' is unreadable (%s); left in place.",
                           sid, store.path, why)
    return removed


def verify_store(store: TileStore, slide_ids: Sequence[str] | None = None) -> VerifyReport:
    """See :meth:`TileStore.verify`; reads only, never locks."""
    ids, unreadable, _ = store._scan()
    if slide_ids is not None:
        want = set(slide_ids)
        ids = [s for s in ids if s in want]
        unreadable = {s: r for s, r in unreadable.items() if s in want}
    damaged, checked, unchecked = {}, [], []
    first_attrs: dict[str, Any] | None = None
    for sid in ids:
        attrs = store.slide_attrs(sid) or {}
        if not attrs.get("checksums"):
            unchecked.append(sid)
            continue
        problems = check_slide(store._slide_dir(sid), attrs)
        checked.append(sid)
        if problems:
            damaged[sid] = "; ".join(problems)
            first_attrs = first_attrs or attrs
    cmd = repair_command(store.path, first_attrs) if first_attrs is not None else ""
    return VerifyReport(store=store.path, checked=tuple(checked), damaged=damaged,
                        unreadable=unreadable, unchecked=tuple(unchecked), repair=cmd)
