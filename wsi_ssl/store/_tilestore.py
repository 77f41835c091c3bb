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
or the new slide, never half of one. One writer process at a time per store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
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

__all__ = ["TileStore", "SlideRecord", "STORE_FORMAT", "STORE_FORMAT_VERSION"]

logger = logging.getLogger(__name__)

STORE_FORMAT = "wsi-ssl-tile-store"
STORE_FORMAT_VERSION = 1
_ARRAYS = ("features", "coords", "views", "view_index")
_FEATURE_DTYPES = ("float16", "float32", "bfloat16")


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def __init__(self, path: str | os.PathLike, mode: Literal["r", "a", "w"] = "a") -> None:
        if mode not in ("r", "a", "w"):
            raise ConfigError(f"mode={mode!r} must be 'r', 'a' or 'w'.")
        self.path = Path(path)
        self.mode = mode
        if mode == "w" and self.path.exists():
            if self.path.is_dir() and (self.path / "zarr.json").exists() or (
                    self.path.is_dir() and not any(self.path.iterdir())):
                shutil.rmtree(self.path)
            else:
                raise StoreError(f"refusing to overwrite '{self.path}' with mode='w': it exists "
                                 "and is not a zarr store.")
        root = self.path / "zarr.json"
        if not root.exists():
            if mode == "r":
                raise StoreError(f"tile store '{self.path}' does not exist; create it with "
                                 "`wsi-ssl embed` or TileStore(path, mode='a').")
            if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
                raise StoreFormatError(f"'{self.path}' exists and is not a tile store (no "
                                       "zarr.json); choose a new path.")
            self._create()
        self._check_format()

    # -- root metadata -------------------------------------------------------------------------
    def _create(self) -> None:
        import zarr

        root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
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
        self._writable()
        import zarr

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
        cur = self.encoder
        if cur == new:
            return
        if cur is not None and cur.get("fingerprint") != new["fingerprint"] and self.slide_ids:
            raise EncoderMismatchError(
                f"tile store '{self.path}' holds {len(self.slide_ids)} slides embedded with "
                f"encoder {cur.get('name')!r} (fingerprint {cur.get('fingerprint')}); refusing to "
                f"add features from {name!r} (fingerprint {fingerprint}). Use a new store path.")
        self._update_root(encoder=new)

    # -- slides --------------------------------------------------------------------------------
    def _slide_dir(self, slide_id: str) -> Path:
        return self.path / "slides" / slide_id

    def slide_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """Attributes of a slide group (cheap: reads one small JSON), or None if absent."""
        meta = _read_json(self._slide_dir(slide_id) / "zarr.json")
        return None if meta is None else dict(meta.get("attributes", {}))

    @property
    def slide_ids(self) -> list[str]:
        """Ids of the complete slides, sorted."""
        base = self.path / "slides"
        if not base.is_dir():
            return []
        out = []
        for d in sorted(base.iterdir()):
            attrs = self.slide_attrs(d.name) if d.is_dir() else None
            if attrs and attrs.get("complete") is True:
                out.append(d.name)
        return out

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
        return zarr.open_array(str(self._slide_dir(slide_id) / name), mode="r", zarr_format=3)

    def _require(self, slide_id: str) -> None:
        if slide_id not in self:
            ids = self.slide_ids
            import difflib

            close = difflib.get_close_matches(str(slide_id), ids, n=3)
            raise KeyError(f"slide {slide_id!r} is not a complete slide of '{self.path}' "
                           f"({len(ids)} slides{'; closest: ' + str(close) if close else ''}).")

    def __getitem__(self, slide_id: str) -> SlideRecord:
        import zarr

        self._require(slide_id)
        try:
            group = zarr.open_group(str(self._slide_dir(slide_id)), mode="r", zarr_format=3)
            arrays = {name: np.asarray(group[name][...]) for name in _ARRAYS}
        except Exception as err:  # noqa: BLE001 - corrupted chunks, missing arrays
            raise StoreFormatError(f"slide '{slide_id}' of '{self.path}' is unreadable ({err}); "
                                   "delete it and re-embed.") from err
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
                    attrs: Mapping[str, Any] | None = None, dtype: str = "float16") -> None:
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
        import zarr

        self._writable()
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
        meta = dict(attrs or {})
        meta.update(encoder=enc["name"], encoder_fingerprint=enc["fingerprint"],
                    n_tiles=int(features.shape[0]), n_views=int(views.shape[0]),
                    view_tiles=int(views.shape[1]), features_dtype=dtype)
        json.dumps(meta)  # fail before writing anything if attrs are not JSON-serialisable

        tmp = self.path / ".tmp" / f"{slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
            n = max(1, features.shape[0])
            _put(g, "features", features.astype(dtype), (min(n, 8192), dim))
            _put(g, "coords", coords.astype(np.int64), (min(n, 65536), 2))
            _put(g, "views", views.astype(dtype), (1, max(1, views.shape[1]), dim))
            _put(g, "view_index", view_index, (1, max(1, views.shape[1])))
            g.attrs.update(meta)
            g.attrs.update({"complete": True})  # last
            final = self._slide_dir(slide_id)
            final.parent.mkdir(parents=True, exist_ok=True)
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
        if slide_id in self.failures:
            self.clear_failure(slide_id)

    def delete_slide(self, slide_id: str) -> None:
        """Remove a slide (atomically: renamed away, then deleted)."""
        self._writable()
        d = self._slide_dir(slide_id)
        if d.exists():
            trash = self.path / ".tmp" / f"{slide_id}.old.{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(d, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def cleanup(self) -> int:
        """Delete leftovers of interrupted writes (``.tmp`` entries of dead processes) and slide
        groups that are not complete; returns how many were removed."""
        self._writable()
        removed = 0
        tmp = self.path / ".tmp"
        if tmp.is_dir():
            for d in tmp.iterdir():
                parts = d.name.split(".")
                pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
                if pid is None or not _pid_alive(pid) or pid == os.getpid():
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
        base = self.path / "slides"
        if base.is_dir():
            for d in base.iterdir():
                attrs = self.slide_attrs(d.name) if d.is_dir() else None
                if d.is_dir() and not (attrs and attrs.get("complete") is True):
                    shutil.rmtree(d, ignore_errors=True)
                    removed += 1
        return removed

    # -- failures ------------------------------------------------------------------------------
    @property
    def failures(self) -> dict[str, dict[str, str]]:
        """``{slide_id: {"path", "error"}}`` of slides whose last embedding attempt failed."""
        return dict(self.root_attrs.get("failures") or {})

    def record_failure(self, slide_id: str, path: str, error: str) -> None:
        fails = self.failures
        fails[slide_id] = {"path": str(path), "error": str(error)}
        self._update_root(failures=fails)

    def clear_failure(self, slide_id: str) -> None:
        fails = self.failures
        if fails.pop(slide_id, None) is not None:
            self._update_root(failures=fails)

    # -- ecosystem files -----------------------------------------------------------------------
    def import_h5(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                  encoder: str = "external", slide_ids: Sequence[str] | None = None,
                  overwrite: bool = False, dtype: str = "float16") -> list[str]:
        """Ingest per-slide feature files of CLAM/TRIDENT (``features``) or STAMP (``feats``).

        See :func:`wsi_ssl.store._h5.import_h5`.
        """
        from wsi_ssl.store._h5 import import_h5

        return import_h5(self, paths, encoder=encoder, slide_ids=slide_ids, overwrite=overwrite,
                         dtype=dtype)

    def export_h5(self, out_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None, *,
                  layout: Literal["clam", "stamp"] = "clam") -> list[Path]:
        """Write one ``<slide_id>.h5`` per slide (see :func:`wsi_ssl.store._h5.export_h5`)."""
        from wsi_ssl.store._h5 import export_h5

        return export_h5(self, out_dir, slide_ids, layout=layout)

    def summary(self) -> dict[str, Any]:
        """Counts and sizes: slides, tiles, views, bytes on disk, bytes per tile/slide."""
        ids = self.slide_ids
        n_tiles = n_views = 0
        for sid in ids:
            a = self.slide_attrs(sid) or {}
            n_tiles += int(a.get("n_tiles", 0))
            n_views += int(a.get("n_views", 0))
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file()
                   and ".tmp" not in f.relative_to(self.path).parts)
        enc = self.encoder or {}
        return {"path": str(self.path), "format_version": self.root_attrs.get("format_version"),
                "encoder": enc.get("name"), "encoder_fingerprint": enc.get("fingerprint"),
                "embed_dim": enc.get("embed_dim"), "slides": len(ids), "tiles": n_tiles,
                "views": n_views, "failures": len(self.failures), "bytes": size,
                "bytes_per_slide": size / max(1, len(ids)), "bytes_per_tile": size / max(1, n_tiles)}


def _put(group: Any, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    arr = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks)
    if data.size:
        arr[...] = data
