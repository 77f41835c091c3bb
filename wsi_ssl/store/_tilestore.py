"""``TileStore``: tile embeddings of many slides in one zarr v3 directory (``docs/store-format.md``).

Layout (format 2)::

    STORE.zarr/
      zarr.json                 root group; attrs: format, format_version (2), encoder, failures
      slides.index              the slide index (``_index``): complete slides, one file read
      slides/<slide_id>/        one group per complete slide, three sharded arrays (``_layout``)
        features   (N, D)       float16 (default) tile embeddings, grid order
        views      (V, T, D)    Giga-SSL shared-augmentation bank, one version per inner chunk
        index      (L,) int64   coords (N, 2) and view_index (V, T), flattened
      .tmp/                     slides being written (never read)

Atomicity: a slide is written under ``.tmp/<id>.<pid>.<token>``, its ``complete`` attr is written
last, then the directory is renamed into ``slides/`` (one ``rename``, the commit point), then its
line is appended to the index. Readers reconcile the index with a listing of ``slides/``, so a
crash at any moment leaves either the old slide, no slide, or the new slide, never half of one.

One writer at a time: every write takes the store's lock (``_lock.StoreLock``; a whole run holds
it through :meth:`TileStore.lock`), so root attributes and the index are read-modified-written
under it and ``.tmp`` leftovers found by a lock holder are provably abandoned. Readers never lock.
Each logical array's checksum and each shard file's size are recorded (``_integrity``); a slide
with a missing or truncated shard is an error when read, not zeros.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl.errors import (
    ConfigError,
    EncoderMismatchError,
    InputError,
    StoreError,
    StoreFormatError,
)
from wsi_ssl.store._h5 import export_h5, import_h5
from wsi_ssl.store._index import INDEX_NAME, SlideIndex
from wsi_ssl.store._integrity import VerifyReport, array_checksum
from wsi_ssl.store._layout import (
    RawShard,
    group_meta,
    plan_layout,
    shard_problems,
    write_arrays,
)
from wsi_ssl.store._lock import LOCK_NAME, LockHolder, StoreLock, StoreLockedError
from wsi_ssl.store._maintenance import cleanup_store, verify_store
from wsi_ssl.store._stats import SlideStats, compute_stats, stats_from_json, stats_to_json
from wsi_ssl.store._summary import StoreSummary

__all__ = ["TileStore", "SlideRecord", "SlideStats", "STORE_FORMAT", "STORE_FORMAT_VERSION",
           "VerifyReport", "StoreLockedError"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "wsi-ssl-tile-store"
STORE_FORMAT_VERSION = 2


def store_format_version(path: Path, meta: Mapping[str, Any]) -> int:
    """The ``format_version`` of a tile store's root ``zarr.json`` (``meta``); a
    :class:`StoreFormatError` when it is not a wsi-ssl tile store or is newer than this
    wsi-ssl (an older one is the caller's business: refused, or upgraded)."""
    attrs = meta.get("attributes") or {}
    if meta.get("zarr_format") != 3 or attrs.get("format") != STORE_FORMAT:
        raise StoreFormatError(f"'{path}' is a zarr group but not a wsi-ssl tile store "
                               f"(format={attrs.get('format')!r}); choose a new path.")
    ver = attrs.get("format_version")
    if not isinstance(ver, int) or ver > STORE_FORMAT_VERSION:
        raise StoreFormatError(f"tile store '{path}' has format_version={ver!r}; newer than this "
                               f"wsi-ssl (it reads format {STORE_FORMAT_VERSION}): upgrade "
                               "wsi-ssl.")
    return ver
_ARRAYS = ("features", "coords", "views", "view_index")  # the logical arrays of a slide
_STORED = {"features": "features", "views": "views", "coords": "index", "view_index": "index"}
_CACHE_SLIDES = 64  # open slides kept per TileStore (metadata and zarr arrays, a few KB each)
#: test hook: ``WSI_SSL_STORE_CRASH_AT=after-commit`` SIGKILLs a writer between the rename that
#: commits a slide and its index line (the window the index must survive)
_CRASH_ENV = "WSI_SSL_STORE_CRASH_AT"
#: storage dtypes of the tile features
FeatureDtype = Literal["float16", "float32", "bfloat16"]
_FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32", "bfloat16")


@dataclass(frozen=True)
class SlideRecord:
    """One complete slide of a :class:`TileStore`, in memory.

    Shape:
        features: ``(N, D)``; coords: ``(N, 2)`` int64 level-0 ``(x, y)``; views: ``(V, T, D)``
        (``(0, 0, D)`` when no views were made); view_index: ``(V, T)`` int64 rows of ``features``.
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    views: np.ndarray
    view_index: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.views.shape[0])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(zarr.json content, None) or (None, why it cannot be read)."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "zarr.json is missing"
    except OSError as err:
        return None, f"zarr.json cannot be read ({err.strerror or err})"
    except ValueError as err:
        return None, f"zarr.json is not valid JSON ({err})"
    if not isinstance(meta, dict):
        return None, "zarr.json is not a JSON object"
    return meta, None


def _only_lock_files(path: Path) -> bool:
    return all(p.name.startswith(LOCK_NAME) for p in path.iterdir())


class TileStore:
    """Tile embeddings of a cohort in a zarr v3 directory.

    Args:
        path: the store directory (``*.zarr`` by convention), on a local or shared filesystem.
        mode: ``"r"`` read only (must exist), ``"a"`` read/write, created if missing, ``"w"``
            delete whatever is there and start empty.

    Example::

        store = TileStore("cohort.zarr")
        for sid in store.slide_ids:
            rec = store[sid]               # SlideRecord: features (N, D), coords (N, 2), ...
    """

    def __init__(self, path: str | os.PathLike, mode: Literal["r", "a", "w"] = "a", *,
                 lock_timeout: float = 300.0) -> None:
        if mode not in ("r", "a", "w"):
            raise ConfigError(f"mode={mode!r} must be 'r', 'a' or 'w'.")
        self._init_state(path, mode, lock_timeout)
        root = self.path / "zarr.json"
        if mode == "w" and self.path.exists():
            if not (self.path.is_dir() and (root.exists() or _only_lock_files(self.path))):
                raise StoreError(f"refusing to overwrite '{self.path}' with mode='w': it exists "
                                 "and is not a zarr store.")
            with self._locked():
                for p in self.path.iterdir():
                    if p.name.startswith(LOCK_NAME):
                        continue
                    if p.is_dir():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
        if not root.exists():
            if mode == "r":
                raise StoreError(f"tile store '{self.path}' does not exist; create it with "
                                 "`wsi-ssl embed` or TileStore(path, mode='a').")
            if self.path.exists() and not self.path.is_dir():
                raise StoreFormatError(f"'{self.path}' exists and is not a tile store (no "
                                       "zarr.json); choose a new path.")
            self.path.mkdir(parents=True, exist_ok=True)
            with self._locked():  # two processes creating one store: one creates, one waits
                if not root.exists():
                    if not _only_lock_files(self.path):
                        raise StoreFormatError(f"'{self.path}' exists and is not a tile store (no "
                                               "zarr.json); choose a new path.")
                    self._create()
        self._check_format()

    def _init_state(self, path: str | os.PathLike, mode: str, lock_timeout: float) -> None:
        self.path = Path(path)
        self.mode = mode
        self.lock_timeout = float(lock_timeout)
        self._lock: StoreLock | None = None
        self._warned: set[str] = set()
        self._index = SlideIndex(self.path)
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._handles_mutex = threading.Lock()

    @classmethod
    def _for_upgrade(cls, path: str | os.PathLike) -> TileStore:
        """A writable handle on a store of an older format (no format check): only
        ``wsi-ssl store upgrade`` (``_upgrade``) uses it, to commit converted slides."""
        self = cls.__new__(cls)
        self._init_state(path, "a", 300.0)
        return self

    # -- the writer lock -----------------------------------------------------------------------
    def _store_lock(self) -> StoreLock:
        if self._lock is None:
            self._lock = StoreLock(self.path)
        return self._lock

    @contextmanager
    def lock(self, *, wait: bool | float = False, command: str | None = None) -> Iterator[None]:
        """Hold the store's exclusive writer lock for a whole job (embed, import, cleanup).

        Args:
            wait: ``False`` fails at once with :class:`StoreLockedError` naming the holder when
                another process writes this store; ``True`` waits for it; a number waits at most
                that many seconds. A crashed holder's lock is taken over (logged).
            command: what other writers are told this process is doing.
        """
        self._writable()
        lock = self._store_lock()
        lock.acquire(wait=wait, command=command, scope="run")
        try:
            yield
        finally:
            lock.release()

    @property
    def writer(self) -> LockHolder | None:
        """Who holds the writer lock right now (None when nobody writes); reading, no lock."""
        return self._store_lock().holder() if (self.path / LOCK_NAME).exists() else None

    @contextmanager
    def _locked(self) -> Iterator[StoreLock]:
        """The lock for one write: the run's hold if this process has one, else taken for the
        call (waiting behind other single writes, failing at once behind a whole run)."""
        lock = self._store_lock()
        lock.acquire_for_call(self.lock_timeout)
        try:
            yield lock
        finally:
            lock.release()

    # -- root metadata -------------------------------------------------------------------------
    def _create(self) -> None:
        import zarr  # lazy: zarr loads when a store is opened, not on import

        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        root.attrs.update({"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
                           "encoder": None, "failures": {}})
        root.require_group("slides")
        self._index.rewrite({})

    def _root_meta(self) -> dict[str, Any]:
        meta = _read_json(self.path / "zarr.json")
        if meta is None:
            raise StoreFormatError(f"'{self.path / 'zarr.json'}' is unreadable; not a tile store.")
        return meta

    @property
    def root_attrs(self) -> dict[str, Any]:
        """The root group's attributes (format, format_version, encoder, failures)."""
        return dict(self._root_meta().get("attributes", {}))

    def _check_format(self) -> None:
        meta = self._root_meta()
        attrs = meta.get("attributes", {})
        ver = store_format_version(self.path, meta)
        if ver < STORE_FORMAT_VERSION or attrs.get("upgrading_to") is not None:
            what = ("an interrupted upgrade to format 2" if attrs.get("upgrading_to") is not None
                    else f"format {ver}")
            raise StoreFormatError(
                f"tile store '{self.path}' is {what}; this wsi-ssl reads and writes format "
                f"{STORE_FORMAT_VERSION} only: run `wsi-ssl store upgrade {self.path}` (rewrites "
                "it in place, slide by slide, resumable).")

    def _update_root(self, **changes: Any) -> None:
        """Write root attributes (the caller holds the lock and read what it modifies under it)."""
        import zarr  # lazy: zarr loads when a store is opened, not on import

        self._store_lock().check()
        root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        root.attrs.update(changes)  # zarr's LocalStore writes zarr.json atomically (tmp+rename)

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"tile store '{self.path}' is open read-only; open it with mode='a'.")

    @property
    def encoder(self) -> dict[str, Any] | None:
        """``{"name", "fingerprint", "embed_dim", "weights"?}`` of the encoder bound to the
        store, or None."""
        return self.root_attrs.get("encoder")

    @property
    def encoder_fingerprint(self) -> str | None:
        enc = self.encoder
        return None if enc is None else enc.get("fingerprint")

    def bind_encoder(self, name: str, fingerprint: str, embed_dim: int,
                     weights: str | None = None) -> None:
        """Record the encoder of this store (``weights``: where its weights come from, e.g.
        ``"random"``); a different one is an :class:`EncoderMismatchError` once the store holds
        slides (an empty store is simply re-bound)."""
        new = {"name": str(name), "fingerprint": str(fingerprint), "embed_dim": int(embed_dim)}
        if weights is not None:
            new["weights"] = str(weights)
        if self.encoder == new:
            return
        self._writable()
        with self._locked():
            cur = self.encoder
            if cur == new:
                return
            n = len(self.slide_ids)
            if cur is not None and cur.get("fingerprint") != new["fingerprint"] and n:
                raise EncoderMismatchError(
                    f"tile store '{self.path}' holds {n} slides embedded with encoder "
                    f"{cur.get('name')!r} (fingerprint {cur.get('fingerprint')}); refusing to add "
                    f"features from {name!r} (fingerprint {fingerprint}). Use a new store path.")
            self._update_root(encoder=new)

    # -- slides: listing -----------------------------------------------------------------------
    def _slide_dir(self, slide_id: str) -> Path:
        return self.path / "slides" / slide_id

    def slide_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a slide group (cheap: reads one small JSON), or None if absent."""
        meta = _read_json(self._slide_dir(slide_id) / "zarr.json")
        return None if meta is None else dict(meta.get("attributes", {}))

    def _dir_names(self) -> set[str]:
        base = self.path / "slides"
        try:
            with os.scandir(base) as it:
                return {e.name for e in it if not e.name.startswith(".") and e.is_dir()}
        except FileNotFoundError:
            return set()
        except OSError as err:
            raise StoreError(f"cannot list '{base}': {err}") from err

    def _probe(self, slide_id: str) -> tuple[str, dict[str, Any] | str]:
        """("complete", index entry) / ("unreadable", reason) / ("incomplete", "") of one group."""
        d = self._slide_dir(slide_id)
        meta, why = _read_meta(d / "zarr.json")
        if meta is None:
            return "unreadable", why or "unreadable"
        attrs = meta.get("attributes") or {}
        if attrs.get("complete") is not True:
            return "incomplete", ""
        return "complete", _entry(d, attrs)

    def _listing(self, full: bool = False) -> tuple[dict[str, dict[str, Any]], dict[str, str],
                                                    list[str], bool]:
        """({complete id: entry}, {unreadable id: reason}, incomplete ids, index agreed).

        The index reconciled with one listing of ``slides/``: entries without a folder are
        dropped, folders without an entry are read (``full=True`` reads every folder: the
        directory scan)."""
        names = self._dir_names()
        loaded = None if full else self._index.load()
        entries = loaded[0] if loaded is not None else {}
        complete = {sid: e for sid, e in entries.items() if sid in names}
        agreed = loaded is not None and len(complete) == len(entries)
        unreadable: dict[str, str] = {}
        incomplete: list[str] = []
        for sid in sorted(names - complete.keys()):
            agreed = False
            state, info = self._probe(sid)
            if state == "complete":
                complete[sid] = info  # type: ignore[assignment]
            elif state == "unreadable":
                unreadable[sid] = str(info)
            else:
                incomplete.append(sid)
        return dict(sorted(complete.items())), unreadable, incomplete, agreed

    def _scan(self) -> tuple[list[str], dict[str, str], list[str]]:
        """(complete ids, {unreadable id: reason}, incomplete ids), index reconciled."""
        complete, unreadable, incomplete, _ = self._listing()
        return list(complete), unreadable, incomplete

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the complete slides, sorted: one read of the slide index and one listing of
        ``slides/`` (see ``_index``). Slide folders outside the index whose metadata cannot be
        read are left out with a logged warning (once per slide)."""
        complete, unreadable, _, _ = self._listing()
        for sid, why in unreadable.items():
            if sid not in self._warned:
                self._warned.add(sid)
                logger.warning("slide '%s' of tile store '%s' is left out: %s. Its arrays are kept; "
                               "restore slides/%s/zarr.json (or re-embed the slide).", sid,
                               self.path, why, sid)
        return list(complete)

    def slide_entries(self) -> dict[str, dict[str, Any]]:
        """``{slide_id: {"n_tiles", "n_views", "view_tiles", "dim", "bytes"}}`` of the complete
        slides, from the index (no per-slide reads for indexed slides)."""
        return self._listing()[0]

    @property
    def unreadable(self) -> dict[str, str]:
        """``{slide_id: reason}`` of slide groups whose ``zarr.json`` cannot be read (a directory
        scan: reads every slide's metadata). They are never deleted (an NFS hiccup or a
        permission change is not proof of garbage)."""
        return self._listing(full=True)[1]

    def rescan(self) -> list[str]:
        """Rebuild the slide index from a scan of every slide folder (``wsi-ssl info --rescan``);
        returns the complete slide ids. On a read-only store the index is left as it is."""
        complete, unreadable, _, _ = self._listing(full=True)
        if self.mode != "r":
            with self._locked() as lock:
                lock.check()
                complete = self._listing(full=True)[0]
                self._index.rewrite(complete)
        for sid, why in unreadable.items():
            logger.warning("rescan: slide '%s' of '%s' is unreadable (%s); left out.", sid,
                           self.path, why)
        return list(complete)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        if not isinstance(slide_id, str):
            return False
        attrs = self.slide_attrs(slide_id)
        return bool(attrs and attrs.get("complete") is True)

    def __iter__(self) -> Iterator[str]:
        return iter(self.slide_ids)

    def __repr__(self) -> str:
        enc = self.encoder or {}
        return (f"TileStore('{self.path}', slides={len(self)}, encoder={enc.get('name')!r}, "
                f"failures={len(self.failures)})")

    # -- slides: reading -----------------------------------------------------------------------
    def _not_found(self, slide_id: str, why: str | None = None) -> KeyError:
        if why is not None:
            return KeyError(f"slide {slide_id!r} of '{self.path}' is unreadable: {why}; restore "
                            "it or re-embed the slide.")

        ids = self.slide_ids
        close = difflib.get_close_matches(str(slide_id), ids, n=3)
        return KeyError(f"slide {slide_id!r} is not a complete slide of '{self.path}' "
                        f"({len(ids)} slides{'; closest: ' + str(close) if close else ''}).")

    def _handle(self, slide_id: str) -> _Handle:
        """The open slide (metadata, lazily opened arrays), cached while its folder is the same."""
        if not isinstance(slide_id, str) or not slide_id or "/" in slide_id \
                or slide_id.startswith("."):
            raise self._not_found(str(slide_id))
        d = self._slide_dir(slide_id)
        try:
            st = os.stat(d)
        except OSError:
            raise self._not_found(slide_id) from None
        key = (st.st_ino, st.st_ctime_ns)
        with self._handles_mutex:
            h = self._handles.get(slide_id)
            if h is not None and h.key == key:
                self._handles.move_to_end(slide_id)
                return h
        meta, why = _read_meta(d / "zarr.json")
        if meta is None:
            raise self._not_found(slide_id, why)
        attrs = dict(meta.get("attributes") or {})
        if attrs.get("complete") is not True:
            raise self._not_found(slide_id)
        if attrs.get("format_version") != STORE_FORMAT_VERSION:
            raise StoreFormatError(
                f"slide '{slide_id}' of '{self.path}' is in format "
                f"{attrs.get('format_version', 1)}; run `wsi-ssl store upgrade {self.path}`.")
        h = _Handle(slide_id, d, key, attrs)
        with self._handles_mutex:
            self._handles[slide_id] = h
            self._handles.move_to_end(slide_id)
            while len(self._handles) > _CACHE_SLIDES:
                self._handles.popitem(last=False)
        return h

    def _require(self, slide_id: str) -> dict[str, Any]:
        return self._handle(slide_id).attrs

    def _damaged(self, slide_id: str, problems: Sequence[str]) -> StoreFormatError:
        return StoreFormatError(
            f"slide '{slide_id}' of '{self.path}' is damaged ({'; '.join(problems)}); list the "
            f"damaged slides with `wsi-ssl info {self.path} --verify` and re-embed them with "
            "`wsi-ssl embed ... --repair`.")

    def _check_chunks(self, slide_id: str, names: Sequence[str] = _ARRAYS,
                      attrs: Mapping[str, Any] | None = None) -> None:
        """Raise unless the shard files of ``names`` (logical arrays) have their written sizes
        (one ``stat`` per shard; zarr would return zeros for a missing or emptied shard)."""
        attrs = attrs if attrs is not None else self._require(slide_id)
        stored = {_STORED[n] for n in names}
        shards = {k: v for k, v in (attrs.get("shards") or {}).items()
                  if k.split("/")[0] in stored}
        lost = shard_problems(self._slide_dir(slide_id), shards)
        if lost:
            raise self._damaged(slide_id, lost)

    def _read(self, h: _Handle, name: str, selection: Any = Ellipsis, *,
              oindex: bool = False) -> np.ndarray:
        self._check_chunks(h.slide_id, [n for n, s in _STORED.items() if s == name], h.attrs)
        try:
            raw = h.raw(name)
            if raw is None:
                arr = h.array(name)
                out = arr.oindex[selection] if oindex else arr[selection]
            elif selection is Ellipsis:
                out = raw.read_range(0, raw.shape[0])
            elif isinstance(selection, slice):
                out = raw.read_range(selection.start or 0, selection.stop)
            else:  # sorted unique rows of the first axis
                out = raw.read_rows(np.asarray(selection, dtype=np.int64))
        except Exception as err:  # noqa: BLE001 - corrupted shards, undecodable chunks
            raise StoreFormatError(
                f"slide '{h.slide_id}' of '{self.path}' is unreadable ({name}: "
                f"{type(err).__name__}: {err}); check it with `wsi-ssl info {self.path} "
                "--verify` and re-embed it with `wsi-ssl embed ... --repair`.") from err
        return np.asarray(out)

    def array(self, slide_id: str, name: str):
        """A lazy ``zarr.Array`` of ``features`` or ``views``; ``coords`` and ``view_index`` (kept
        together in the ``index`` array in format 2) come back as numpy arrays."""
        if name not in _ARRAYS:
            raise ConfigError(f"array name {name!r} must be one of {_ARRAYS}.")
        h = self._handle(slide_id)
        self._check_chunks(slide_id, (name,), h.attrs)
        if name == "coords":
            return self.read_coords(slide_id)
        if name == "view_index":
            return self._read_view_index(h, None)
        return h.array(name)

    def read_features(self, slide_id: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Clean tile features (``rows`` of them, in that order, or all) without the view bank.

        Shape:
            returns ``(N, D)`` or ``(len(rows), D)`` in the stored dtype.
        """
        h = self._handle(slide_id)
        if rows is None:
            return self._read(h, "features")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = int(h.attrs.get("n_tiles", 0))
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise InputError(f"slide {slide_id!r}: rows must be in [0, {n}); got "
                             f"[{rows.min()}, {rows.max()}].")
        if not rows.size:
            return np.zeros((0, int(h.attrs.get("dim", 0))), h.array("features").dtype)
        uniq, inv = np.unique(rows, return_inverse=True)
        return self._read(h, "features", uniq, oindex=True)[inv]

    def read_coords(self, slide_id: str) -> np.ndarray:
        """``(N, 2)`` int64 level-0 ``(x, y)`` of a slide's tiles (reads the coords part of its
        ``index`` array only)."""
        h = self._handle(slide_id)
        n = int(h.attrs.get("n_tiles", 0))
        if n == 0:
            return np.zeros((0, 2), np.int64)
        return self._read(h, "index", slice(0, 2 * n)).astype(np.int64).reshape(n, 2)

    def _read_view_index(self, h: _Handle, versions: np.ndarray | None) -> np.ndarray:
        v, t = int(h.attrs.get("n_views", 0)), int(h.attrs.get("view_tiles", 0))
        off = int(h.attrs["layout"]["index_view_offset"])
        if versions is None:
            if v * t == 0:
                return np.zeros((0, 0), np.int64)
            return self._read(h, "index", slice(off, off + v * t)).astype(np.int64).reshape(v, t)
        if versions.size == 0 or t == 0:
            return np.zeros((len(versions), t), np.int64)
        pos = (off + versions[:, None] * t + np.arange(t)[None, :]).reshape(-1)
        return self._read(h, "index", pos, oindex=True).astype(np.int64).reshape(-1, t)

    def read_views(self, slide_id: str, versions: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Bank versions of a slide: reads only those versions' inner chunks (one each in
        ``views``, one each in ``index``), never the clean features or other versions.

        Shape:
            returns views ``(len(versions), T, D)`` (stored dtype) and view_index
            ``(len(versions), T)`` int64, in the order of ``versions`` (repeats allowed).
        """
        h = self._handle(slide_id)
        vers = np.asarray(versions, dtype=np.int64).reshape(-1)
        v, t = int(h.attrs.get("n_views", 0)), int(h.attrs.get("view_tiles", 0))
        if vers.size and (vers.min() < 0 or vers.max() >= v):
            raise InputError(f"slide {slide_id!r} has {v} bank versions; versions must be in "
                             f"[0, {v}), got {vers.tolist()[:8]}.")
        dim = int(h.attrs.get("dim", 0))
        if vers.size == 0:
            return (np.zeros((0, t, dim), h.array("views").dtype), np.zeros((0, t), np.int64))
        uniq, inv = np.unique(vers, return_inverse=True)
        views = self._read(h, "views", uniq, oindex=True)
        vidx = self._read_view_index(h, uniq)
        return views[inv], vidx[inv]

    def slide_stats(self, slide_id: str) -> SlideStats:
        """The slide's :class:`SlideStats`, from its metadata (one small JSON read, cached).

        A slide without stored statistics has them computed once from its arrays and cached in
        its ``features`` attributes under the writer lock; on a read-only store (or filesystem),
        or while another process holds the lock, they are computed in memory only.
        """
        h = self._handle(slide_id)
        if h.stats is not None:
            return h.stats
        meta = h.meta("features") or {}
        stats = stats_from_json((meta.get("attributes") or {}).get("stats") or {})
        if stats is None:
            rec = self[slide_id]
            stats = compute_stats(rec.features, rec.views)
            self._cache_stats(h, stats)
        h.stats = stats
        return stats

    def _cache_stats(self, h: _Handle, stats: SlideStats) -> None:
        if self.mode == "r":
            return
        try:
            with self._locked() as lock:
                lock.check()
                st = os.stat(h.dir)
                if (st.st_ino, st.st_ctime_ns) != h.key:
                    return  # replaced meanwhile: its writer stored its own stats
                path = h.dir / "features" / "zarr.json"
                meta = json.loads(path.read_text())
                meta.setdefault("attributes", {})["stats"] = stats_to_json(stats)
                atomic_write_bytes(path, json.dumps(meta, indent=2).encode(), fsync=False)
        except (OSError, StoreError, ValueError) as err:
            logger.info("slide '%s': statistics computed in memory, not cached (%s)", h.slide_id,
                        err)

    def _read_logical(self, slide_id: str, name: str) -> np.ndarray:
        """One logical array (``features``, ``coords``, ``views``, ``view_index``) in full."""
        h = self._handle(slide_id)
        if name == "features":
            return self._read(h, "features")
        if name == "coords":
            return self.read_coords(slide_id)
        if name == "view_index":
            return self._read_view_index(h, None)
        views = self._read(h, "views")
        return views if views.size else np.zeros((0, 0, int(h.attrs["dim"])), views.dtype)

    def __getitem__(self, slide_id: str) -> SlideRecord:
        h = self._handle(slide_id)
        self._check_chunks(slide_id, attrs=h.attrs)
        arrays = {name: self._read_logical(slide_id, name) for name in _ARRAYS}
        return SlideRecord(slide_id, arrays["features"], arrays["coords"], arrays["views"],
                           arrays["view_index"], dict(h.attrs))

    @property
    def fingerprint(self) -> str:
        """Hash of the encoder fingerprint and the complete slide ids (identifies the content a
        model was trained on)."""
        h = hashlib.sha256(str(self.encoder_fingerprint).encode())
        for sid in self.slide_ids:
            h.update(b"\0" + sid.encode())
        return h.hexdigest()[:16]

    # -- slides: writing -----------------------------------------------------------------------
    def write_slide(self, slide_id: str, features: np.ndarray, coords: np.ndarray, *,
                    views: np.ndarray | None = None, view_index: np.ndarray | None = None,
                    attrs: Mapping[str, Any] | None = None,
                    dtype: FeatureDtype = "float16") -> None:
        """Write (or replace) one slide atomically; ``complete`` is written last.

        Also records the slide's :class:`SlideStats` and checksums, and its index line.

        Args:
            slide_id: group name (``[A-Za-z0-9._-]``).
            features: ``(N, D)`` embeddings; ``D`` must equal the bound encoder's ``embed_dim``.
            coords: ``(N, 2)`` level-0 ``(x, y)``.
            views: ``(V, T, D)`` augmented views or None (stored as ``(0, 0, D)``).
            view_index: ``(V, T)`` rows of ``features`` used by each view.
            attrs: JSON-serialisable slide attributes (source, mpp, tile size, settings...).
            dtype: storage dtype of ``features`` and ``views``.
        """
        self._writable()
        with self._locked() as lock:
            self._write_slide(lock, slide_id, features, coords, views, view_index, attrs, dtype)

    def _write_slide(self, lock: StoreLock, slide_id: str, features: np.ndarray,
                     coords: np.ndarray, views: np.ndarray | None, view_index: np.ndarray | None,
                     attrs: Mapping[str, Any] | None, dtype: str) -> None:
        enc = self.encoder
        if enc is None:
            raise StoreError(f"tile store '{self.path}' has no encoder bound; call "
                             "bind_encoder(name, fingerprint, embed_dim) first.")
        if dtype not in _FEATURE_DTYPES:
            raise ConfigError(f"dtype={dtype!r} must be one of {_FEATURE_DTYPES}.")
        if not slide_id or slide_id.startswith(".") or any(
                not (c.isalnum() or c in "._-") for c in slide_id):
            raise InputError(f"slide_id={slide_id!r} must use only [A-Za-z0-9._-]; pass it "
                             "through wsi_ssl._utils.sanitize_id.")
        features = np.asarray(features)
        coords = np.asarray(coords)
        dim = int(enc["embed_dim"])
        if features.ndim != 2 or features.shape[1] != dim:
            raise InputError(f"slide {slide_id!r}: features must be (N, {dim}) for encoder "
                             f"{enc['name']!r}; got {features.shape}.")
        if coords.shape != (features.shape[0], 2):
            raise InputError(f"slide {slide_id!r}: coords must be ({features.shape[0]}, 2); got "
                             f"{coords.shape}.")
        if views is None or np.asarray(views).size == 0:
            views = np.zeros((0, 0, dim), np.float32)
            view_index = np.zeros((0, 0), np.int64)
        views = np.asarray(views)
        view_index = np.asarray(view_index if view_index is not None else [], np.int64)
        if views.ndim != 3 or views.shape[2] != dim or view_index.shape != views.shape[:2]:
            raise InputError(f"slide {slide_id!r}: views must be (V, T, {dim}) with view_index "
                             f"(V, T); got {views.shape} and {view_index.shape}.")
        if view_index.size and (view_index.min() < 0 or view_index.max() >= len(features)):
            raise InputError(f"slide {slide_id!r}: view_index has rows outside [0, "
                             f"{len(features)}).")
        data = {"features": np.ascontiguousarray(features, dtype=dtype),
                "coords": np.ascontiguousarray(coords, dtype=np.int64),
                "views": np.ascontiguousarray(views, dtype=dtype),
                "view_index": np.ascontiguousarray(view_index)}
        meta = dict(attrs or {})
        for key in ("stats", "shards", "layout", "checksums", "complete"):
            meta.pop(key, None)  # ours, recomputed (a record read back and written again)
        n, (v, t) = int(features.shape[0]), views.shape[:2]
        plan = plan_layout(n, dim, int(v), int(t), data["features"].dtype.itemsize)
        meta.update(encoder=enc["name"], encoder_fingerprint=enc["fingerprint"],
                    format_version=STORE_FORMAT_VERSION, n_tiles=n, n_views=int(v),
                    view_tiles=int(t), dim=dim, features_dtype=dtype,
                    layout={"features_chunk_rows": int(plan["features"]["chunks"][0]),
                            "index_view_offset": int(plan["view_offset"])})
        json.dumps(meta)  # fail before writing anything if attrs are not JSON-serialisable
        self._commit(lock, slide_id, data, plan, meta)

    def _commit(self, lock: StoreLock, slide_id: str, data: Mapping[str, np.ndarray],
                plan: Mapping[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """Write the arrays under ``.tmp``, then the group's ``zarr.json`` (``complete: true``),
        rename the group into ``slides/`` (the commit point), then append its index line.

        The checksums and statistics are computed in threads while this thread writes the
        shard files (hashlib and numpy release the GIL). Returns the attributes written."""
        tmp = self.path / ".tmp" / f"{slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            with ThreadPoolExecutor(3) as pool:
                sums = {k: pool.submit(array_checksum, a) for k, a in data.items()}
                stats = pool.submit(compute_stats, data["features"], data["views"], pool)
                tmp.mkdir()
                meta["shards"] = write_arrays(tmp, data, plan,
                                              lambda: stats_to_json(stats.result()))
                meta["checksums"] = {k: {"sha256": f.result()} for k, f in sums.items()}
                meta["all_finite"] = stats.result().all_finite
            meta["complete"] = True
            (tmp / "zarr.json").write_bytes(group_meta(meta))  # last
            final = self._slide_dir(slide_id)
            final.parent.mkdir(parents=True, exist_ok=True)
            lock.check()  # a writer that lost its lock to a takeover must not commit
            trash = None
            if final.exists():
                trash = self.path / ".tmp" / f"{slide_id}.old.{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
            os.rename(tmp, final)  # the commit point
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.environ.get(_CRASH_ENV) == "after-commit":
            os.kill(os.getpid(), signal.SIGKILL)
        self._index.append(added={slide_id: _entry(final, meta)})
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        self.clear_failure(slide_id)
        return meta

    def delete_slide(self, slide_id: str) -> None:
        """Remove a slide (atomically: renamed away, then deleted), under the lock."""
        self._writable()
        with self._locked() as lock:
            d = self._slide_dir(slide_id)
            if d.exists():
                lock.check()
                trash = self.path / ".tmp" / f"{slide_id}.old.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(d, trash)
                self._index.append(removed=[slide_id])
                shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> int:
        """Delete what is provably garbage; returns how many entries were removed.

        Under the lock, every ``.tmp`` entry is a leftover of a writer that no longer holds it
        (writers only create them while holding the lock), so all are removed. Slide groups whose
        ``zarr.json`` is readable and does not say ``complete: true`` are removed. Slide groups
        whose ``zarr.json`` cannot be read are left alone and reported (:attr:`unreadable`).
        The slide index is rebuilt when it is missing or disagrees with the folders.
        """
        self._writable()
        return cleanup_store(self)

    # -- failures ------------------------------------------------------------------------------
    @property
    def failures(self) -> dict[str, dict[str, str]]:
        """``{slide_id: {"path", "error"}}`` of slides whose last embedding attempt failed."""
        return dict(self.root_attrs.get("failures") or {})

    def record_failure(self, slide_id: str, path: str, error: str) -> None:
        """Record (or replace) a slide's failure; atomic under the lock (no lost updates)."""
        self._writable()
        with self._locked():
            fails = self.failures
            fails[slide_id] = {"path": str(path), "error": str(error)}
            self._update_root(failures=fails)

    def clear_failure(self, slide_id: str) -> None:
        self._writable()
        if slide_id not in self.failures:
            return
        with self._locked():
            fails = self.failures
            if fails.pop(slide_id, None) is not None:
                self._update_root(failures=fails)

    # -- integrity -----------------------------------------------------------------------------
    def verify(self, slide_ids: Sequence[str] | None = None, *, threads: int | None = None,
               progress: bool | None = None) -> VerifyReport:
        """Re-read every slide (or ``slide_ids``) and compare it with what was recorded at write
        time: missing or truncated shard files, undecodable chunks, altered bytes. Slides whose
        metadata cannot be read are listed too. Reads everything, in ``threads`` threads
        (default: up to 4); never takes the lock (so repair can verify before locking).
        ``progress`` shows a bar (``None``: on a terminal)."""
        return verify_store(self, slide_ids, threads=threads, progress=progress)

    # -- ecosystem files -----------------------------------------------------------------------
    def import_h5(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                  encoder: str = "external", slide_ids: Sequence[str] | None = None,
                  overwrite: bool = False, dtype: FeatureDtype = "float16",
                  wait: bool | float = False) -> list[str]:
        """Ingest per-slide feature files of CLAM/TRIDENT (``features``) or STAMP (``feats``),
        holding the store's lock for the whole import (``wait`` as in :meth:`lock`).

        See :func:`wsi_ssl.store._h5.import_h5`.
        """
        return import_h5(self, paths, encoder=encoder, slide_ids=slide_ids, overwrite=overwrite,
                         dtype=dtype, wait=wait)

    def export_h5(self, out_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None, *,
                  layout: Literal["clam", "stamp"] = "clam") -> list[Path]:
        """Write one ``<slide_id>.h5`` per slide (see :func:`wsi_ssl.store._h5.export_h5`)."""
        return export_h5(self, out_dir, slide_ids, layout=layout)

    def summary(self) -> StoreSummary:
        """Counts and sizes: slides, tiles, views, bytes on disk, bytes per tile/slide, from the
        slide index (no per-slide reads for indexed slides)."""
        entries, unreadable, _, _ = self._listing()
        n_tiles = sum(int(e.get("n_tiles") or 0) for e in entries.values())
        n_views = sum(int(e.get("n_views") or 0) for e in entries.values())
        size = sum(int(e.get("bytes") or 0) for e in entries.values())
        for name in ("zarr.json", INDEX_NAME, "slides/zarr.json"):
            try:
                size += (self.path / name).stat().st_size
            except OSError:
                pass
        enc = self.encoder or {}
        return StoreSummary(
            path=str(self.path), format_version=self.root_attrs.get("format_version"),
            encoder=enc.get("name"), encoder_fingerprint=enc.get("fingerprint"),
            embed_dim=enc.get("embed_dim"), slides=len(entries), tiles=n_tiles, views=n_views,
            failures=len(self.failures), bytes=size, unreadable=len(unreadable),
            bytes_per_slide=size / max(1, len(entries)), bytes_per_tile=size / max(1, n_tiles))


class _Handle:
    """One open slide: its attributes, lazily opened zarr arrays and statistics (thread-safe:
    the worst race opens an array twice)."""

    def __init__(self, slide_id: str, d: Path, key: tuple[int, int],
                 attrs: dict[str, Any]) -> None:
        self.slide_id = slide_id
        self.dir = d
        self.key = key
        self.attrs = attrs
        self.stats: SlideStats | None = None
        self._arrays: dict[str, Any] = {}
        self._meta: dict[str, dict[str, Any] | None] = {}
        self._raw: dict[str, RawShard | None] = {}

    def meta(self, name: str) -> dict[str, Any] | None:
        """The parsed ``zarr.json`` of one of the slide's arrays (None when unreadable)."""
        if name not in self._meta:
            self._meta[name] = _read_json(self.dir / name / "zarr.json")
        return self._meta[name]

    def raw(self, name: str) -> RawShard | None:
        """The direct reader of an array written by this format (None: read through zarr)."""
        if name not in self._raw:
            meta = self.meta(name)
            self._raw[name] = None if meta is None else RawShard.open(self.dir / name, meta)
        return self._raw[name]

    def array(self, name: str) -> Any:
        arr = self._arrays.get(name)
        if arr is None:
            import zarr  # lazy: zarr loads when a store is opened, not on import

            arr = zarr.open_array(str(self.dir / name), mode="r", zarr_format=3)
            self._arrays[name] = arr
        return arr


def _dir_bytes(d: Path) -> int:
    total = 0
    for root, _, files in os.walk(d):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _entry(d: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The index line of a complete slide."""
    return {"n_tiles": int(attrs.get("n_tiles", 0)), "n_views": int(attrs.get("n_views", 0)),
            "view_tiles": int(attrs.get("view_tiles", 0)),
            "dim": int(attrs["dim"]) if attrs.get("dim") is not None else None,
            "bytes": _dir_bytes(d)}
