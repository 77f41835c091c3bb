"""Per-slide statistics recorded at write time (what slide SSL needs before its first step).

``write_slide`` computes, from the arrays as stored, the tile count, whether every value of the
features and of the view bank is finite, and the per-dimension sum and sum of squares (float64) of
the features and of all ``V * T`` bank rows. They are kept in the ``stats`` attribute of the
slide's ``features`` array, the float vectors as base64 of little-endian float64 (43.7 KB of JSON
at ``D = 1024``), so a run's setup reads one small JSON file per slide.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SlideStats", "compute_stats", "stats_to_json", "stats_from_json"]

_ENCODING = "base64-float64-le"
_VECTORS = ("features_sum", "features_sumsq", "views_sum", "views_sumsq")
_BLOCK = 1024  # rows summed in float32 before being added to the float64 totals


@dataclass(frozen=True, eq=False)
class SlideStats:
    """Statistics of one slide of a :class:`~wsi_ssl.store.TileStore`.

    Attributes:
        n_tiles, n_views, view_tiles, dim: ``N``, ``V``, ``T``, ``D``.
        all_finite: every value of ``features`` and ``views`` is finite (no NaN/inf).
        features_sum, features_sumsq: per-dimension sum and sum of squares over the ``N`` tiles.
        views_sum, views_sumsq: the same over all ``V * T`` bank rows.

    Shape:
        each vector: ``(D,)`` float64 (rows summed in float32 blocks of 1,024, then in float64).
    """

    n_tiles: int
    n_views: int
    view_tiles: int
    dim: int
    all_finite: bool
    features_sum: np.ndarray
    features_sumsq: np.ndarray
    views_sum: np.ndarray
    views_sumsq: np.ndarray

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SlideStats):
            return NotImplemented
        return ((self.n_tiles, self.n_views, self.view_tiles, self.dim, self.all_finite)
                == (other.n_tiles, other.n_views, other.view_tiles, other.dim, other.all_finite)
                and all(np.array_equal(getattr(self, k), getattr(other, k)) for k in _VECTORS))

    __hash__ = None  # type: ignore[assignment]

    @property
    def features_mean(self) -> np.ndarray:
        """``(D,)`` per-dimension mean of the features (zeros for an empty slide)."""
        return self.features_sum / max(1, self.n_tiles)


def _sums(rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.zeros(dim, np.float64)
    q = np.zeros(dim, np.float64)
    for i in range(0, len(rows), _BLOCK):
        block = np.asarray(rows[i:i + _BLOCK], dtype=np.float32)
        s += block.sum(axis=0)
        q += np.einsum("ij,ij->j", block, block)
    return s, q


def compute_stats(features: np.ndarray, views: np.ndarray,
                  pool: Executor | None = None) -> SlideStats:
    """The statistics of a slide from its arrays as stored (features and views summed in two
    threads of ``pool`` when given: numpy releases the GIL).

    Shape:
        features: ``(N, D)``; views: ``(V, T, D)`` (``(0, 0, D)`` without a bank).
    """
    n, dim = features.shape
    v, t = views.shape[:2]
    rows = views.reshape(v * t, dim)
    if pool is not None:
        later = pool.submit(_sums, rows, dim)
        fs, fq = _sums(features, dim)
        vs, vq = later.result()
    else:
        fs, fq = _sums(features, dim)
        vs, vq = _sums(rows, dim)
    # a NaN/inf anywhere makes its column sum non-finite (float32 blocks of float16/32 values
    # cannot overflow to inf otherwise: 1,024 * 65,504^2 < 3.4e38)
    finite = bool(np.isfinite(fs).all() and np.isfinite(fq).all() and np.isfinite(vs).all()
                  and np.isfinite(vq).all())
    if finite and features.dtype == np.float32:  # float32 squares can overflow: check directly
        finite = bool(np.isfinite(features).all() and np.isfinite(views).all())
    return SlideStats(int(n), int(v), int(t), int(dim), finite, fs, fq, vs, vq)


def stats_to_json(stats: SlideStats) -> dict[str, Any]:
    """The JSON form kept in ``features/zarr.json`` (``attributes.stats``)."""
    out: dict[str, Any] = {"n_tiles": stats.n_tiles, "n_views": stats.n_views,
                           "view_tiles": stats.view_tiles, "dim": stats.dim,
                           "all_finite": stats.all_finite, "encoding": _ENCODING}
    for name in _VECTORS:
        vec = np.ascontiguousarray(getattr(stats, name), dtype="<f8")
        out[name] = base64.b64encode(vec.tobytes()).decode("ascii")
    return out


def stats_from_json(data: Mapping[str, Any]) -> SlideStats | None:
    """Back from :func:`stats_to_json`; ``None`` when absent or not in this encoding."""
    if not isinstance(data, Mapping) or data.get("encoding") != _ENCODING:
        return None
    try:
        dim = int(data["dim"])
        vecs = {}
        for name in _VECTORS:
            vec = np.frombuffer(base64.b64decode(data[name]), dtype="<f8").astype(np.float64)
            if vec.shape != (dim,):
                return None
            vecs[name] = vec
        return SlideStats(int(data["n_tiles"]), int(data["n_views"]), int(data["view_tiles"]),
                          dim, bool(data["all_finite"]), **vecs)
    except (KeyError, TypeError, ValueError):
        return None
