"""Store-side measurements for ``benchmarks/bench_scale.py`` (not imported by the library).

:func:`measure_write_rate` commits synthetic slides through the public ``write_slide`` (what the
embed driver's writer does) and reports slides/s: the issue-20 target is >= 5 slides/s at TCGA
shape (10,000 tiles x 1,024 dims float16, a 50 x 256 bank).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl.store._tilestore import TileStore

__all__ = ["measure_write_rate", "synthetic_slide"]


def synthetic_slide(rng: np.random.Generator, tiles: int, dim: int, views: int, view_tiles: int,
                    dtype: str = "float16") -> dict[str, np.ndarray]:
    """Random arrays of the real structure (embeddings ~ N(0, 1), a grid of coords)."""
    feats = rng.standard_normal((tiles, dim), dtype=np.float32).astype(dtype)
    side = max(1, int(np.ceil(np.sqrt(tiles))))
    grid = np.stack(np.divmod(np.arange(tiles), side), 1)[:, ::-1] * 224
    vidx = rng.integers(0, max(1, tiles), (views, view_tiles)) if tiles else np.zeros(
        (0, 0), np.int64)
    bank = (feats[vidx] if views else np.zeros((0, 0, dim), dtype)).astype(dtype)
    return {"features": feats, "coords": grid.astype(np.int64), "views": bank,
            "view_index": vidx.astype(np.int64)}


def measure_write_rate(path: str | os.PathLike, *, n_slides: int = 8, tiles: int = 10_000,
                       dim: int = 1024, views: int = 50, view_tiles: int = 256,
                       dtype: str = "float16", seed: int = 0) -> dict[str, Any]:
    """Commit ``n_slides`` synthetic slides into a new store at ``path`` inside one lock hold
    (as the embed driver does) and time it. The arrays are made before the clock starts (two
    distinct slides reused), so only the store's work is measured.

    Returns:
        ``{"slides", "seconds", "slides_per_s", "mb_per_s", "files_per_slide", "bytes_per_slide"}``.
    """
    rng = np.random.default_rng(seed)
    made = [synthetic_slide(rng, tiles, dim, views, view_tiles, dtype) for _ in range(2)]
    store = TileStore(path, mode="w")
    store.bind_encoder("synthetic", "synthetic", dim)
    with store.lock(command="measure_write_rate"):
        t0 = time.perf_counter()
        for i in range(n_slides):
            d = made[i % 2]
            store.write_slide(f"s{i:05d}", d["features"], d["coords"], views=d["views"],
                              view_index=d["view_index"], dtype=dtype)  # type: ignore[arg-type]
        secs = time.perf_counter() - t0
    one = Path(path) / "slides" / "s00000"
    files = 1 + sum(len(ds) + len(fs) for _, ds, fs in os.walk(one))
    nbytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(one) for f in fs)
    return {"slides": n_slides, "seconds": secs, "slides_per_s": n_slides / secs,
            "mb_per_s": n_slides * nbytes / secs / 1e6, "files_per_slide": files,
            "bytes_per_slide": nbytes}
