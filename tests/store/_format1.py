"""A writer of the format-1 tile-store layout (wsi-ssl before issue 20), kept as a test helper so
that upgrade tests start from a store made exactly as the old code made it: one zarr v3 group per
slide, four plain arrays (``features``, ``coords``, ``views``, ``view_index``) with ``/``-nested
chunk files (one per bank version), ``checksums`` with SHA-256 and chunk counts."""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from pathlib import Path

import numpy as np
import zarr


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _n_chunks(shape, chunks) -> int:
    if not shape or 0 in shape:
        return 0 if shape else 1
    return int(math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)))


def create_format1_store(path: Path, encoder: str = "enc-a", fingerprint: str = "fp-a",
                         dim: int = 8) -> Path:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs.update({"format": "wsi-ssl-tile-store", "format_version": 1,
                       "encoder": {"name": encoder, "fingerprint": fingerprint,
                                   "embed_dim": int(dim)}, "failures": {}})
    root.require_group("slides")
    return Path(path)


def write_format1_slide(path: Path, slide_id: str, features, coords, views=None, view_index=None,
                        attrs=None, dtype: str = "float16") -> None:
    """The format-1 ``TileStore._write_slide`` (no lock: tests write one store in one process)."""
    root = zarr.open_group(str(path), mode="r")
    enc = dict(root.attrs["encoder"])
    dim = int(enc["embed_dim"])
    features, coords = np.asarray(features), np.asarray(coords)
    if views is None or np.asarray(views).size == 0:
        views, view_index = np.zeros((0, 0, dim), np.float32), np.zeros((0, 0), np.int64)
    views = np.asarray(views)
    view_index = np.asarray(view_index, np.int64)
    data = {"features": features.astype(dtype), "coords": coords.astype(np.int64),
            "views": views.astype(dtype), "view_index": view_index}
    n, t = max(1, features.shape[0]), max(1, views.shape[1])
    chunks = {"features": (min(n, 8192), dim), "coords": (min(n, 65536), 2),
              "views": (1, t, dim), "view_index": (1, t)}
    meta = dict(attrs or {})
    meta.update(encoder=enc["name"], encoder_fingerprint=enc["fingerprint"],
                n_tiles=int(features.shape[0]), n_views=int(views.shape[0]),
                view_tiles=int(views.shape[1]), features_dtype=dtype,
                checksums={k: {"sha256": _sha(v), "chunks": _n_chunks(v.shape, chunks[k])}
                           for k, v in data.items()})
    tmp = Path(path) / ".tmp" / f"{slide_id}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name in ("features", "coords", "views", "view_index"):
        arr = g.create_array(name, shape=data[name].shape, dtype=data[name].dtype,
                             chunks=chunks[name], config={"write_empty_chunks": True})
        if data[name].size:
            arr[...] = data[name]
    g.attrs.update(meta)
    g.attrs.update({"complete": True})
    os.rename(tmp, Path(path) / "slides" / slide_id)
