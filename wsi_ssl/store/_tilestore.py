"""``TileStore``: tile embeddings of many slides in one zarr v3 directory (``docs/store-format.md``).

Layout::

    STORE.zarr/
      zarr.json                 root group; attrs: format, format_version, encoder, failures
      slides/<slide_id>/        one group per slide (complete slides only)
        features   (N, D)       float16 (default) tile embeddings, grid order
        coords     (N, 2)       int64 level-0 (x, y) of each tile's top-left corner
        views      (V, T, D)    Giga-SSL shared-augmentation bank (V may be 0)
        view_index (V, T)       int64 rows of features/coords that each view tile comes from
      .tmp/                     slides being written (never read)

Atomicity: a slide is written under ``.tmp/<id>.<pid>.<token>``, its ``complete`` attr is written
last, then the directory is renamed into ``slides/`` (one ``rename``). Readers only see groups
whose ``complete`` attr is true, so a crash at any moment leaves either the old slide, no slide,
or the new slide, never half of one.

One writer at a time: every write takes the store's lock (``_lock.StoreLock``; a whole run holds
it through :meth:`TileStore.lock`), so root attributes are read-modified-written under it and
``.tmp`` leftovers found by a lock holder are provably abandoned. Readers never lock. Each array's
checksum and chunk count are recorded (``_integrity``); a slide with missing chunk files is an
error when read, not zeros.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl.errors import (
    ConfigError,
    EncoderMismatchError,
    InputError,
    StoreError,
    StoreFormatError,
)
from wsi_ssl.store._integrity import VerifyReport, array_checksum, expected_chunks, missing_chunks
from wsi_ssl.store._lock import LOCK_NAME, LockHolder, StoreLock, StoreLockedError
from wsi_ssl.store._summary import StoreSummary

__all__ = ["TileStore", "SlideRecord", "STORE_FORMAT", "STORE_FORMAT_VERSION", "VerifyReport",
           "StoreLockedError"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "wsi-ssl-tile-store"
STORE_FORMAT_VERSION = 1
_ARRAYS = ("features", "coords", "views", "view_index")
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
        self.path = Path(path)
        self.mode = mode
        self.lock_timeout = float(lock_timeout)
        self._lock: StoreLock | None = None
        self._warned: set[str] = set()
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
        import zarr

        root = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        root.attrs.update({"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION,
                           "encoder": None, "failures": {}})
        root.require_group("slides")

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
        if meta.get("zarr_format") != 3 or attrs.get("format") != STORE_FORMAT:
            raise StoreFormatError(f"'{self.path}' is a zarr group but not a wsi-ssl tile store "
                                   f"(format={attrs.get('format')!r}); choose a new path.")
        ver = attrs.get("format_version")
        if not isinstance(ver, int) or ver > STORE_FORMAT_VERSION:
            raise StoreFormatError(f"tile store '{self.path}' has format_version={ver!r}; this "
                                   f"wsi-ssl reads up to {STORE_FORMAT_VERSION}: upgrade wsi-ssl.")

    def _update_root(self, **changes: Any) -> None:
        """Write root attributes (the caller holds the lock and read what it modifies under it)."""
        import zarr

        self._store_lock().check()
        root = zarr.open_group(str(self.path), mode="r+", zarr_format=3)
        root.attrs.update(changes)  # zarr's LocalStore writes zarr.json atomically (tmp+rename)

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"tile store '{self.path}' is open read-only; open it with mode='a'.")

    @property
    def encoder(self) -> dict[str, Any] | None:
        """``{"name", "fingerprint", "embed_dim"}`` of the encoder bound to the store, or None."""
        return self.root_attrs.get("encoder")

    @property
    def encoder_fingerprint(self) -> str | None:
        enc = self.encoder
        return None if enc is None else enc.get("fingerprint")

    def bind_encoder(self, name: str, fingerprint: str, embed_dim: int) -> None:
        """Record the encoder of this store; a different one is an :class:`EncoderMismatchError`
        once the store holds slides (an empty store is simply re-bound)."""
        new = {"name": str(name), "fingerprint": str(fingerprint), "embed_dim": int(embed_dim)}
        if self.encoder == new:
            return
        self._writable()
        with self._locked():
            cur = self.encoder
            if cur == new:
                return
            n = len(self._scan()[0])
            if cur is not None and cur.get("fingerprint") != new["fingerprint"] and n:
                raise EncoderMismatchError(
                    f"tile store '{self.path}' holds {n} slides embedded with encoder "
                    f"{cur.get('name')!r} (fingerprint {cur.get('fingerprint')}); refusing to add "
                    f"features from {name!r} (fingerprint {fingerprint}). Use a new store path.")
            self._update_root(encoder=new)

    # -- slides --------------------------------------------------------------------------------
    def _slide_dir(self, slide_id: str) -> Path:
        return self.path / "slides" / slide_id

    def slide_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a slide group (cheap: reads one small JSON), or None if absent."""
        meta = _read_json(self._slide_dir(slide_id) / "zarr.json")
        return None if meta is None else dict(meta.get("attributes", {}))

    def _scan(self) -> tuple[list[str], dict[str, str], list[str]]:
        """(complete ids, {unreadable id: reason}, incomplete ids) of the groups under slides/."""
        base = self.path / "slides"
        complete, unreadable, incomplete = [], {}, []
        try:
            entries = sorted(base.iterdir()) if base.is_dir() else []
        except OSError as err:
            raise StoreError(f"cannot list '{base}': {err}") from err
        for d in entries:
            if not d.is_dir() or d.name.startswith("."):
                continue
            meta, why = _read_meta(d / "zarr.json")
            if meta is None:
                unreadable[d.name] = why or "unreadable"
            elif (meta.get("attributes") or {}).get("complete") is True:
                complete.append(d.name)
            else:
                incomplete.append(d.name)
        return complete, unreadable, incomplete

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the complete slides, sorted. Slides whose metadata cannot be read are left out
        with a logged warning (once per slide) and listed by :attr:`unreadable`."""
        ids, unreadable, _ = self._scan()
        for sid, why in unreadable.items():
            if sid not in self._warned:
                self._warned.add(sid)
                logger.warning("slide '%s' of tile store '%s' is left out: %s. Its arrays are kept; "
                               "restore slides/%s/zarr.json (or re-embed the slide).", sid,
                               self.path, why, sid)
        return ids

    @property
    def unreadable(self) -> dict[str, str]:
        """``{slide_id: reason}`` of slide groups whose ``zarr.json`` cannot be read. They are
        never deleted (an NFS hiccup or a permission change is not proof of garbage)."""
        return self._scan()[1]

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

    def array(self, slide_id: str, name: str):
        """A lazy ``zarr.Array`` (``features``, ``coords``, ``views`` or ``view_index``)."""
        import zarr

        if name not in _ARRAYS:
            raise ConfigError(f"array name {name!r} must be one of {_ARRAYS}.")
        self._require(slide_id)
        self._check_chunks(slide_id, (name,))
        return zarr.open_array(str(self._slide_dir(slide_id) / name), mode="r", zarr_format=3)

    def _require(self, slide_id: str) -> dict[str, Any]:
        attrs = self.slide_attrs(slide_id) if isinstance(slide_id, str) else None
        if not (attrs and attrs.get("complete") is True):
            ids, unreadable, _ = self._scan()
            if slide_id in unreadable:
                raise KeyError(f"slide {slide_id!r} of '{self.path}' is unreadable: "
                               f"{unreadable[slide_id]}; restore it or re-embed the slide.")
            import difflib

            close = difflib.get_close_matches(str(slide_id), ids, n=3)
            raise KeyError(f"slide {slide_id!r} is not a complete slide of '{self.path}' "
                           f"({len(ids)} slides{'; closest: ' + str(close) if close else ''}).")
        return attrs

    def _check_chunks(self, slide_id: str, names: Sequence[str] = _ARRAYS,
                      attrs: Mapping[str, Any] | None = None) -> None:
        attrs = attrs if attrs is not None else (self.slide_attrs(slide_id) or {})
        sums = attrs.get("checksums") or {}
        lost = missing_chunks(self._slide_dir(slide_id),
                              {"checksums": {k: v for k, v in sums.items() if k in names}})
        if lost:
            raise StoreFormatError(
                f"slide '{slide_id}' of '{self.path}' is damaged ({'; '.join(lost)}); list the "
                f"damaged slides with `wsi-ssl info {self.path} --verify` and re-embed them with "
                "`wsi-ssl embed ... --repair`.")

    def __getitem__(self, slide_id: str) -> SlideRecord:
        import zarr

        attrs = self._require(slide_id)
        self._check_chunks(slide_id, attrs=attrs)
        try:
            group = zarr.open_group(str(self._slide_dir(slide_id)), mode="r", zarr_format=3)
            arrays = {name: np.asarray(group[name][...]) for name in _ARRAYS}
        except Exception as err:  # noqa: BLE001 - corrupted chunks, missing arrays
            raise StoreFormatError(f"slide '{slide_id}' of '{self.path}' is unreadable ({err}); "
                                   f"check it with `wsi-ssl info {self.path} --verify` and "
                                   "re-embed it with `wsi-ssl embed ... --repair`.") from err
        return SlideRecord(slide_id, arrays["features"], arrays["coords"].astype(np.int64),
                           arrays["views"], arrays["view_index"].astype(np.int64),
                           dict(group.attrs))

    @property
    def fingerprint(self) -> str:
        """Hash of the encoder fingerprint and the complete slide ids (identifies the content a
        model was trained on)."""
        h = hashlib.sha256(str(self.encoder_fingerprint).encode())
        for sid in self.slide_ids:
            h.update(b"\0" + sid.encode())
        return h.hexdigest()[:16]

    def write_slide(self, slide_id: str, features: np.ndarray, coords: np.ndarray, *,
                    views: np.ndarray | None = None, view_index: np.ndarray | None = None,
                    attrs: Mapping[str, Any] | None = None,
                    dtype: FeatureDtype = "float16") -> None:
        """Write (or replace) one slide atomically; ``complete`` is written last.

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
        import zarr

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
        data = {"features": features.astype(dtype), "coords": coords.astype(np.int64),
                "views": views.astype(dtype), "view_index": view_index}
        n, t = max(1, features.shape[0]), max(1, views.shape[1])
        chunks = {"features": (min(n, 8192), dim), "coords": (min(n, 65536), 2),
                  "views": (1, t, dim), "view_index": (1, t)}
        meta = dict(attrs or {})
        meta.update(encoder=enc["name"], encoder_fingerprint=enc["fingerprint"],
                    n_tiles=int(features.shape[0]), n_views=int(views.shape[0]),
                    view_tiles=int(views.shape[1]), features_dtype=dtype,
                    checksums={k: {"sha256": array_checksum(v),
                                   "chunks": expected_chunks(v.shape, chunks[k])}
                               for k, v in data.items()})
        json.dumps(meta)  # fail before writing anything if attrs are not JSON-serialisable

        tmp = self.path / ".tmp" / f"{slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            for name in _ARRAYS:
                _put(g, name, data[name], chunks[name])
            g.attrs.update(meta)
            g.attrs.update({"complete": True})  # last
            final = self._slide_dir(slide_id)
            final.parent.mkdir(parents=True, exist_ok=True)
            lock.check()  # a writer that lost its lock to a takeover must not commit
            trash = None
            if final.exists():
                trash = self.path / ".tmp" / f"{slide_id}.old.{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
            os.rename(tmp, final)  # the commit point
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.clear_failure(slide_id)

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
                shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> int:
        """Delete what is provably garbage; returns how many entries were removed.

        Under the lock, every ``.tmp`` entry is a leftover of a writer that no longer holds it
        (writers only create them while holding the lock), so all are removed. Slide groups whose
        ``zarr.json`` is readable and does not say ``complete: true`` are removed. Slide groups
        whose ``zarr.json`` cannot be read are left alone and reported (:attr:`unreadable`).
        """
        from wsi_ssl.store._maintenance import cleanup_store

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
    def verify(self, slide_ids: Sequence[str] | None = None) -> VerifyReport:
        """Re-read every slide (or ``slide_ids``) and compare it with what was recorded at write
        time: missing chunk files, undecodable chunks, altered bytes. Slides whose metadata cannot
        be read are listed too. Slow (reads everything); reading never needs the lock."""
        from wsi_ssl.store._maintenance import verify_store

        return verify_store(self, slide_ids)

    # -- ecosystem files -----------------------------------------------------------------------
    def import_h5(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                  encoder: str = "external", slide_ids: Sequence[str] | None = None,
                  overwrite: bool = False, dtype: FeatureDtype = "float16",
                  wait: bool | float = False) -> list[str]:
        """Ingest per-slide feature files of CLAM/TRIDENT (``features``) or STAMP (``feats``),
        holding the store's lock for the whole import (``wait`` as in :meth:`lock`).

        See :func:`wsi_ssl.store._h5.import_h5`.
        """
        from wsi_ssl.store._h5 import import_h5

        return import_h5(self, paths, encoder=encoder, slide_ids=slide_ids, overwrite=overwrite,
                         dtype=dtype, wait=wait)

    def export_h5(self, out_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None, *,
                  layout: Literal["clam", "stamp"] = "clam") -> list[Path]:
        """Write one ``<slide_id>.h5`` per slide (see :func:`wsi_ssl.store._h5.export_h5`)."""
        from wsi_ssl.store._h5 import export_h5

        return export_h5(self, out_dir, slide_ids, layout=layout)

    def summary(self) -> StoreSummary:
        """Counts and sizes: slides, tiles, views, bytes on disk, bytes per tile/slide."""
        ids = self.slide_ids
        n_tiles = n_views = 0
        for sid in ids:
            a = self.slide_attrs(sid) or {}
            n_tiles += int(a.get("n_tiles", 0))
            n_views += int(a.get("n_views", 0))
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()
                   and ".tmp" not in f.relative_to(self.path).parts
                   and not f.name.startswith(LOCK_NAME))
        enc = self.encoder or {}
        return StoreSummary(
            path=str(self.path), format_version=self.root_attrs.get("format_version"),
            encoder=enc.get("name"), encoder_fingerprint=enc.get("fingerprint"),
            embed_dim=enc.get("embed_dim"), slides=len(ids), tiles=n_tiles, views=n_views,
            failures=len(self.failures), bytes=size, unreadable=len(self.unreadable),
            bytes_per_slide=size / max(1, len(ids)), bytes_per_tile=size / max(1, n_tiles))


def _put(group: Any, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    # every chunk gets a file (even all-zero ones), so a missing file is always damage
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                             config={"write_empty_chunks": True})
    if data.size:
        arr[...] = data
