"""Per-slide HDF5 feature files of the ecosystem, in and out of a :class:`TileStore`.

* CLAM and TRIDENT: ``features`` ``(N, D)`` (sometimes ``(1, N, D)``) and ``coords`` ``(N, 2)``
  level-0 ``(x, y)``, with ``patch_size``/``patch_level`` attrs on ``coords``.
* STAMP (KatherLab): ``feats`` ``(N, D)`` and ``coords`` ``(N, 2)``.

Imported slides get no augmentation bank (``V = 0``): slide SSL needs ``wsi-ssl embed --views``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl._utils import atomic_write_bytes, file_fingerprint, sanitize_id
from wsi_ssl._version import __version__
from wsi_ssl.errors import ConfigError, InputError, StoreFormatError

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store._tilestore import FeatureDtype, TileStore

__all__ = ["import_h5", "export_h5", "external_fingerprint"]

_FEATURE_KEYS = ("features", "feats")


def external_fingerprint(name: str, dim: int) -> str:
    """The fingerprint recorded for features made elsewhere: a hash of the encoder name the user
    gives and the dimension (we cannot hash weights we do not have)."""
    return hashlib.sha256(f"external:{name}:{int(dim)}".encode()).hexdigest()[:16]


def _json_safe(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist() if value.size <= 16 else f"array{value.shape}"
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    import h5py  # lazy: h5py only for HDF5 import/export

    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise StoreFormatError(f"'{path}' is not a readable HDF5 file: {err}") from err
    with fh:
        key = next((k for k in _FEATURE_KEYS if k in fh), None)
        if key is None or "coords" not in fh:
            raise StoreFormatError(
                f"'{path}' has datasets {sorted(fh.keys())[:8]}; expected 'features' (CLAM/"
                "TRIDENT) or 'feats' (STAMP) together with 'coords'.")
        feats = np.asarray(fh[key][...])
        coords = np.asarray(fh["coords"][...])
        attrs = {f"h5.{k}": _json_safe(v) for k, v in fh.attrs.items()}
        attrs.update({f"h5.coords.{k}": _json_safe(v) for k, v in fh["coords"].attrs.items()})
        attrs["source_format"] = "stamp" if key == "feats" else "clam"
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if coords.ndim == 3 and coords.shape[0] == 1:
        coords = coords[0]
    if feats.ndim != 2 or coords.ndim != 2 or coords.shape[1] != 2 or len(coords) != len(feats):
        raise StoreFormatError(f"'{path}': features {feats.shape} and coords {coords.shape} must "
                               "be (N, D) and (N, 2).")
    if not np.issubdtype(feats.dtype, np.floating) or not np.isfinite(feats).all():
        raise InputError(f"'{path}': features must be finite floats; got {feats.dtype} with "
                         "NaN/inf or non-float values.")
    return feats, coords.astype(np.int64), attrs


def import_h5(store: TileStore, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
              encoder: str = "external", slide_ids: Sequence[str] | None = None,
              overwrite: bool = False, dtype: FeatureDtype = "float16",
              wait: bool | float = False) -> list[str]:
    """Ingest per-slide ``.h5`` feature files (CLAM/TRIDENT ``features`` or STAMP ``feats``),
    holding the store's writer lock for the whole import.

    Args:
        store: the destination (writable).
        paths: files, folders (all ``*.h5``) or glob patterns.
        encoder: the name of the encoder that made the features (e.g. ``"uni"``); the store is
            bound to ``(encoder, D)``, so features of another encoder are refused.
        slide_ids: one id per file (default: the sanitised file stem, or the parent folder name
            when the file is called ``features.h5``).
        overwrite: replace slides already in the store (default: skip them).
        dtype: storage dtype of the features (``"float16"`` halves the size; ``"float32"``).
        wait: when another process writes the store: ``False`` fails at once naming it
            (:class:`~wsi_ssl.store.StoreLockedError`), ``True`` waits, a number waits that long.

    Returns:
        The ids written.
    """
    with store.lock(wait=wait):
        return _import_h5(store, paths, encoder=encoder, slide_ids=slide_ids,
                          overwrite=overwrite, dtype=dtype)


def _import_h5(store: TileStore, paths: str | os.PathLike | Sequence[str | os.PathLike], *,
               encoder: str, slide_ids: Sequence[str] | None, overwrite: bool,
               dtype: FeatureDtype) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files += sorted(p.rglob("*.h5"))
        elif p.is_file():
            files.append(p)
        else:

            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True))
            if not found:
                raise InputError(f"'{p}' matches no .h5 feature file.")
            files += found
    if slide_ids is not None and len(slide_ids) != len(files):
        raise InputError(f"slide_ids has {len(slide_ids)} entries for {len(files)} files.")
    written = []
    for i, f in enumerate(files):
        sid = slide_ids[i] if slide_ids is not None else sanitize_id(
            f.parent.name if f.stem in ("features", "feats") else f.stem)
        if sid in store and not overwrite:
            continue
        feats, coords, attrs = _read_h5(f)
        store.bind_encoder(encoder, external_fingerprint(encoder, feats.shape[1]), feats.shape[1])
        attrs.update(source=str(f.resolve()), source_file=file_fingerprint(f), imported=True)
        for key in ("h5.coords.patch_size", "h5.patch_size"):
            if isinstance(attrs.get(key), int):
                attrs.setdefault("tile_size_level0", attrs[key])
        attrs["wsi_ssl_version"] = __version__
        store.write_slide(sid, feats, coords, attrs=attrs, dtype=dtype)
        written.append(sid)
    return written


def export_h5(store: TileStore, out_dir: str | os.PathLike, slide_ids: Sequence[str] | None = None,
              *, layout: Literal["clam", "stamp"] = "clam") -> list[Path]:
    """Write ``<out_dir>/<slide_id>.h5`` per slide: ``features`` (CLAM/TRIDENT layout) or ``feats``
    (STAMP) float32 ``(N, D)`` and ``coords`` int64 ``(N, 2)``; slide attrs become HDF5 attrs."""
    import h5py  # lazy: h5py only for HDF5 import/export

    if layout not in ("clam", "stamp"):
        raise ConfigError(f"layout={layout!r} must be 'clam' (dataset 'features') or 'stamp' "
                          "('feats').")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = "features" if layout == "clam" else "feats"
    paths = []
    for sid in (store.slide_ids if slide_ids is None else list(slide_ids)):
        feats = store.read_features(sid)  # features and coords only, not the view bank
        coords = store.read_coords(sid)
        attrs = store.slide_attrs(sid) or {}

        buf = io.BytesIO()
        with h5py.File(buf, "w") as fh:
            fh.create_dataset(key, data=feats.astype(np.float32))
            ds = fh.create_dataset("coords", data=coords.astype(np.int64))
            if "tile_size_level0" in attrs:
                ds.attrs["patch_size"] = int(attrs["tile_size_level0"])
            for k, v in attrs.items():
                if isinstance(v, (str, int, float, bool)):
                    fh.attrs[k] = v
        path = out / f"{sid}.h5"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
