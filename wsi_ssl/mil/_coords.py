"""Tile positions in grid units: the coordinates that coordinate-aware MIL heads take.

A tile store records level-0 pixel ``(x, y)`` of every tile; heads want positions in units of
the tiling's stride (``stride_level0``, level-0 px between neighbouring tiles), so that
neighbours are one unit apart whatever the magnification.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["grid_stride", "to_grid_units"]

#: attrs keys read, in order, for the level-0 stride of a slide's grid
_STRIDE_KEYS = ("stride_level0", "stride", "tile_size_level0", "read_size_level0")


def grid_stride(coords: np.ndarray, attrs: Mapping[str, Any] | None = None) -> float:
    """Level-0 pixels between neighbouring tiles.

    From ``attrs`` (``stride_level0``, ...) when the store recorded it, else the smallest positive
    gap between distinct x or y coordinates (1.0 for a single tile).

    Args:
        coords: tile positions, level-0 px.
        attrs: the slide's attributes in the store.

    Shape:
        coords ``(N, 2)``.
    """
    for key in _STRIDE_KEYS:
        val = (attrs or {}).get(key)
        if val is None:
            continue
        try:
            val = float(val)
        except (TypeError, ValueError):
            continue
        if val > 0:
            return val
    c = np.asarray(coords)
    gaps = []
    for axis in range(2):
        d = np.diff(np.unique(c[:, axis])) if len(c) else np.empty(0)
        d = d[d > 0]
        if len(d):
            gaps.append(float(d.min()))
    return min(gaps) if gaps else 1.0


def to_grid_units(coords: np.ndarray, attrs: Mapping[str, Any] | None = None) -> np.ndarray:
    """Level-0 pixel coordinates divided by :func:`grid_stride`.

    Shape:
        coords ``(N, 2)`` -> ``(N, 2)`` float32.
    """
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return (c / grid_stride(c, attrs)).astype(np.float32)
