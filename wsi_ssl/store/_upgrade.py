"""``wsi-ssl store upgrade``: rewrite a format-1 tile store as format 2, in place.

Slide by slide, under the store's writer lock: each format-1 group is read (every chunk file
present, every array's SHA-256 equal to the checksum recorded when it was written), written again
through the format-2 commit (``.tmp`` then a rename over the old group) and its new checksums
compared with the old ones. The root says ``upgrading_to: 2`` while this runs, so no reader or
writer uses a half-converted store; a killed upgrade is resumed by running the command again
(converted slides carry ``format_version: 2`` and are skipped). The last step rebuilds the slide
index and sets ``format_version: 2``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl._utils import progress as bar_of
from wsi_ssl.errors import StoreError, StoreFormatError
from wsi_ssl.store._integrity import array_checksum
from wsi_ssl.store._layout import plan_layout
from wsi_ssl.store._tilestore import (
    STORE_FORMAT_VERSION,
    TileStore,
    store_format_version,
)

__all__ = ["UpgradeReport", "upgrade_store"]

logger = logging.getLogger(__name__)

_FORMAT1_ARRAYS = ("features", "coords", "views", "view_index")


@dataclass(frozen=True, kw_only=True)
class UpgradeReport:
    """What :func:`upgrade_store` did.

    Attributes:
        store: the store path.
        from_version: the format it found (2 when there was nothing to do).
        converted: slides rewritten by this call.
        already: slides that were format 2 already (an interrupted upgrade resumed).
        unchecked: converted slides that had no recorded checksums to verify.
        dropped: damaged slides deleted (``drop_damaged=True``); re-embed them.
        unreadable: ``{slide_id: reason}`` groups whose metadata cannot be read (left as they
            are; restore them and rerun the upgrade).
    """

    store: Path
    from_version: int
    converted: tuple[str, ...] = ()
    already: tuple[str, ...] = ()
    unchecked: tuple[str, ...] = ()
    dropped: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


def _root(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except (OSError, ValueError) as err:
        raise StoreFormatError(f"'{path / 'zarr.json'}' is unreadable ({err}); not a tile "
                               "store.") from err
    return meta


def _format1_problems(d: Path, attrs: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The logical arrays of a format-1 slide group and what is wrong with them."""
    import zarr  # lazy: zarr only when a slide is converted

    sums = attrs.get("checksums") or {}
    data: dict[str, np.ndarray] = {}
    problems = []
    for name in _FORMAT1_ARRAYS:
        want = (sums.get(name) or {}).get("chunks")
        if want is not None:
            have = sum(len(files) for _, _, files in os.walk(d / name / "c"))
            if have < int(want):
                problems.append(f"{name}: {int(want) - have} of {int(want)} chunk files missing")
                continue
        try:
            data[name] = np.asarray(zarr.open_array(str(d / name), mode="r", zarr_format=3)[...])
        except Exception as err:  # noqa: BLE001 - any codec/IO error means "unreadable"
            problems.append(f"{name}: unreadable chunk ({type(err).__name__}: {err})")
            continue
        rec = sums.get(name)
        if rec and array_checksum(data[name]) != rec.get("sha256"):
            problems.append(f"{name}: bytes differ from the recorded checksum (altered)")
    return data, problems


def upgrade_store(path: str | os.PathLike, *, wait: bool | float = False,
                  drop_damaged: bool = False, progress: bool | None = None) -> UpgradeReport:
    """Rewrite the store at ``path`` from format 1 to format 2 in place (see the module
    docstring); resumable, under the writer lock (``wait`` as in :meth:`TileStore.lock`).

    Args:
        path: the store directory.
        wait: when another process writes the store: ``False`` fails at once naming it.
        drop_damaged: delete format-1 slides whose chunks are missing or whose bytes differ from
            their checksums (they cannot be converted faithfully; re-embed them afterwards)
            instead of stopping with an error that lists them.
        progress: show a progress bar (``None``: on a terminal).

    Raises:
        StoreFormatError: not a tile store, a newer format, or damaged slides (listed).
    """
    path = Path(path)
    meta = _root(path)
    attrs = meta.get("attributes") or {}
    ver = store_format_version(path, meta)
    if ver == STORE_FORMAT_VERSION and attrs.get("upgrading_to") is None:
        logger.info("tile store '%s' is format %d already; nothing to do", path, ver)
        return UpgradeReport(store=path, from_version=ver)
    store = TileStore._for_upgrade(path)
    with store.lock(wait=wait, command=f"wsi-ssl store upgrade {path}"):
        lock = store._store_lock()
        store._update_root(upgrading_to=STORE_FORMAT_VERSION)
        tmp = path / ".tmp"
        if tmp.is_dir():  # under the lock: leftovers of writers that are gone
            shutil.rmtree(tmp, ignore_errors=True)
        if store._index.load() is None:
            store._index.rewrite({})
        t = _upgrade_slides(store, lock, (attrs.get("encoder") or {}).get("name"),
                            drop_damaged=drop_damaged, progress=progress)
        if t.damaged:
            lines = "; ".join(f"{s}: {w}" for s, w in sorted(t.damaged.items()))
            raise StoreFormatError(
                f"tile store '{path}': {len(t.damaged)} format-1 slides are damaged and cannot "
                f"be converted faithfully ({lines}). Rerun `wsi-ssl store upgrade {path} "
                "--drop-damaged` to delete them (then re-embed them with `wsi-ssl embed`); the "
                f"{len(t.converted)} converted slides are kept.")
        _finish(store, lock, path)
    logger.info("upgrade: '%s' is format %d (%d slides converted, %d already, %d dropped)",
                path, STORE_FORMAT_VERSION, len(t.converted) + len(t.unchecked), len(t.already),
                len(t.dropped))
    return UpgradeReport(store=path, from_version=int(ver),
                         converted=tuple(t.converted + t.unchecked), already=tuple(t.already),
                         unchecked=tuple(t.unchecked), dropped=t.dropped,
                         unreadable=t.unreadable)


@dataclass
class _Tally:
    """The slides of an upgrade by outcome (see :class:`UpgradeReport`); ``damaged``: not
    converted, not dropped."""

    converted: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    damaged: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


def _upgrade_slides(store: TileStore, lock: Any, encoder: str | None, *, drop_damaged: bool,
                    progress: bool | None) -> _Tally:
    """Convert every format-1 slide group of ``store`` (under its lock), one by one."""
    t = _Tally()
    names = sorted(store._dir_names())
    bar = bar_of(total=len(names), desc="upgrade", unit="slide",
                 disable=None if progress is None else not progress)
    try:
        for sid in names:
            bar.update(1)
            d = store._slide_dir(sid)
            state, info = store._probe(sid)
            if state == "unreadable":
                t.unreadable[sid] = str(info)
                continue
            if state == "incomplete":
                logger.info("upgrade: removing incomplete slide group '%s'", sid)
                shutil.rmtree(d, ignore_errors=True)
                continue
            old = store.slide_attrs(sid) or {}
            if old.get("format_version") == STORE_FORMAT_VERSION:
                t.already.append(sid)
                continue
            data, problems = _format1_problems(d, old)
            if problems:
                why = "; ".join(problems)
                if drop_damaged:
                    logger.warning("upgrade: slide '%s' is damaged (%s); dropped, re-embed it",
                                   sid, why)
                    store.delete_slide(sid)
                    t.dropped[sid] = why
                else:
                    t.damaged[sid] = why
                continue
            _convert(store, lock, sid, old, data, encoder)
            (t.converted if old.get("checksums") else t.unchecked).append(sid)
    finally:
        bar.close()
    return t


def _convert(store: TileStore, lock: Any, sid: str, old: Mapping[str, Any],
             data: Mapping[str, np.ndarray], encoder: str | None) -> None:
    """Write one format-1 slide's arrays again as format 2 and check its checksums."""
    feats, views = data["features"], data["views"]
    n, dim = feats.shape
    v, t = views.shape[:2]
    if views.size == 0:
        views = np.zeros((0, 0, dim), feats.dtype)
    new = {k: val for k, val in old.items()
           if k not in ("checksums", "complete", "shards", "layout")}
    plan = plan_layout(int(n), int(dim), int(v) if views.size else 0,
                       int(t) if views.size else 0, feats.dtype.itemsize)
    new.update(format_version=STORE_FORMAT_VERSION, n_tiles=int(n),
               n_views=int(views.shape[0]), view_tiles=int(views.shape[1]),
               dim=int(dim), features_dtype=str(feats.dtype),
               layout={"features_chunk_rows": int(plan["features"]["chunks"][0]),
                       "index_view_offset": int(plan["view_offset"])})
    new.setdefault("encoder", encoder)
    arrays = {"features": feats, "coords": data["coords"].astype(np.int64),
              "views": views, "view_index": data["view_index"].astype(np.int64)
              if views.size else np.zeros((0, 0), np.int64)}
    written = store._commit(lock, sid, arrays, plan, new)
    for name, rec in (old.get("checksums") or {}).items():
        if written["checksums"][name]["sha256"] != rec.get("sha256"):
            raise StoreError(f"upgrade of slide '{sid}' of '{store.path}': {name} differs "
                             "after rewriting (a bug); the store is left with "
                             "upgrading_to set: report it.")


def _finish(store: TileStore, lock: Any, path: Path) -> None:
    """Rebuild the slide index and mark the root format 2 (the last step)."""
    complete = store._listing(full=True)[0]
    store._index.rewrite(complete)
    meta = _root(path)
    meta.setdefault("attributes", {}).pop("upgrading_to", None)
    meta["attributes"]["format_version"] = STORE_FORMAT_VERSION
    lock.check()
    atomic_write_bytes(path / "zarr.json", json.dumps(meta, indent=2).encode(), fsync=True)
