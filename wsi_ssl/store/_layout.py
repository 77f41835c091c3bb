"""Format 2 of one slide group: three sharded zarr v3 arrays, one shard file each.

::

    slides/<slide_id>/
      zarr.json             group attributes ("complete": true last)
      features/zarr.json    (N, D) float16/float32, inner chunks of <= 4 MiB rows
      features/c.0.0        its one shard file
      views/zarr.json       (V, T, D), inner chunk (1, T, D): one bank version per inner chunk
      views/c.0.0.0
      index/zarr.json       int64 (L,): coords (N, 2) at [0, 2N), view_index (V, T) at [P, P + V*T)
      index/c.0

Eight files and three folders per slide with a bank (11), fewer without. The logical arrays
(``features``, ``coords``, ``views``, ``view_index``) are what the checksums are computed on.
The size of every shard file is recorded (``shards`` attribute): a missing or truncated shard is
damage, never zeros (zarr itself returns the fill value for a missing or empty shard).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ARRAYS", "LOGICAL", "plan_layout", "write_arrays", "shard_problems"]

ARRAYS = ("features", "views", "index")
LOGICAL = ("features", "coords", "views", "view_index")
_KEYS = {"name": "default", "separator": "."}
FEATURE_CHUNK_BYTES = 4 * 1024 * 1024
_INDEX_CHUNK = 65536


def _even_chunks(n: int, target: int) -> int:
    """Rows per inner chunk: at most ``target``, splitting ``n`` into equal pieces (little pad)."""
    if n <= 0:
        return 1
    pieces = math.ceil(n / max(1, target))
    return math.ceil(n / pieces)


def plan_layout(n: int, dim: int, v: int, t: int, itemsize: int) -> dict[str, Any]:
    """Shapes, inner chunks and shards of the three stored arrays of one slide."""
    rows = _even_chunks(n, max(1, FEATURE_CHUNK_BYTES // max(1, dim * itemsize)))
    q = t if v * t else max(1, min(2 * n, _INDEX_CHUNK))
    offset = math.ceil(2 * n / q) * q
    length = offset + v * t
    return {
        "features": {"shape": (n, dim), "chunks": (rows, dim),
                     "shards": (max(1, math.ceil(n / rows)) * rows, dim)},
        "views": {"shape": (v, t, dim), "chunks": (1, max(1, t), dim),
                  "shards": (max(1, v), max(1, t), dim)},
        "index": {"shape": (length,), "chunks": (q,),
                  "shards": (max(1, math.ceil(length / q)) * q,)},
        "view_offset": offset,
    }


def shard_key(name: str, ndim: int) -> str:
    return f"{name}/c." + ".".join("0" * ndim)


def write_arrays(group_dir: Path, data: Mapping[str, np.ndarray], plan: Mapping[str, Any],
                 stats: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Write the three arrays into the (new, empty) group, ``stats`` as an attribute of
    ``features``; returns ``{shard key: bytes}``."""
    import zarr
    from zarr.codecs import ZstdCodec

    group = zarr.open_group(str(group_dir), mode="w", zarr_format=3)
    n = data["features"].shape[0]
    v, t = data["view_index"].shape
    index = np.zeros(plan["index"]["shape"], np.int64)
    index[:2 * n] = data["coords"].reshape(-1)
    off = plan["view_offset"]
    index[off:off + v * t] = data["view_index"].reshape(-1)
    stored = {"features": data["features"], "views": data["views"], "index": index}
    sizes = {}
    for name in ARRAYS:
        p = plan[name]
        arr = group.create_array(
            name, shape=p["shape"], dtype=stored[name].dtype, chunks=p["chunks"],
            shards=p["shards"], chunk_key_encoding=_KEYS,
            compressors=ZstdCodec(level=1) if name == "index" else None,
            config={"write_empty_chunks": True},
            attributes=(
                {"coords": [0, 2 * n, [n, 2]], "view_index": [off, off + v * t, [v, t]]}
                if name == "index" else {"stats": dict(stats)} if name == "features" and stats
                else None))
        if stored[name].size:
            arr[...] = stored[name]
            key = shard_key(name, len(p["shape"]))
            sizes[key] = os.path.getsize(group_dir / key)
    return sizes


def shard_problems(slide_dir: Path, shards: Mapping[str, int]) -> list[str]:
    """``"views: shard file missing"``-style problems, from the recorded shard sizes."""
    out = []
    for key, size in shards.items():
        name = key.split("/")[0]
        try:
            have = os.stat(slide_dir / key).st_size
        except FileNotFoundError:
            out.append(f"{name}: shard file {key} missing")
            continue
        except OSError as err:
            out.append(f"{name}: shard file {key} unreadable ({err.strerror or err})")
            continue
        if have != int(size):
            out.append(f"{name}: shard file {key} has {have} bytes, {int(size)} were written "
                       "(truncated or altered)")
    return out
