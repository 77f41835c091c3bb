"""Data side of slide-level contrastive pretraining (Giga-SSL): reading slides from a
:class:`~wsi_ssl.store.TileStore` once, a byte-bounded cache, coordinate augmentation and the
sampling of k-tile views.

Coordinates handed to heads are in **grid units**: level-0 pixels ``(x, y)`` divided by the
tiling's ``stride_level0`` (read from the slide's attrs, else inferred from the coordinates).

Reference: Lazard et al., "Giga-SSL: Self-Supervised Learning for Gigapixel Images", CVPRW 2023.
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsi_ssl.errors import ConfigError, InputError, StoreFormatError
from wsi_ssl.mil._coords import grid_stride, to_grid_units

__all__ = ["CoordAugment", "augment_coords", "SlideData", "SlideBank", "grid_stride"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True, kw_only=True)
class CoordAugment:
    """Augmentation of the tile coordinates of one view (for coordinate-aware heads).

    Giga-SSL augments the positions of the sampled tiles so that a sparse-convolution head cannot
    recognise a slide by its absolute layout. One draw per view: a rotation about the centroid,
    random flips of each axis, a per-axis scale and a translation; the result is shifted to be
    non-negative.

    Attributes:
        rotate: rotate by an angle uniform in [0, 2 pi).
        flip: flip x and y, each with probability 1/2.
        scale: per-axis scale range (paper: 0.7-1.3).
        translate: maximum translation in grid units (uniform in [0, translate] per axis).
    """

    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.7, 1.3)
    translate: float = 16.0

    def __post_init__(self) -> None:
        for name in ("rotate", "flip"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"CoordAugment {name}={getattr(self, name)!r} must be True or "
                                  "False.")
        try:
            lo, hi = (float(v) for v in self.scale)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"CoordAugment scale={self.scale!r} must be two numbers "
                              "(low, high), e.g. (0.7, 1.3).") from err
        if not (0 < lo <= hi < float("inf")):
            raise ConfigError(f"CoordAugment scale={self.scale!r} must be 0 < low <= high, "
                              "e.g. (0.7, 1.3).")
        if (isinstance(self.translate, bool) or not isinstance(self.translate, (int, float))
                or not 0 <= self.translate < float("inf")):
            raise ConfigError(f"CoordAugment translate={self.translate!r} must be a number >= 0 "
                              "(grid units).")
        object.__setattr__(self, "scale", (lo, hi))


def augment_coords(coords: np.ndarray, rng: np.random.Generator, cfg: CoordAugment) -> np.ndarray:
    """Augment the coordinates of one view (one random draw for all its tiles).

    Args:
        coords: tile positions in grid units.
        rng: the random generator (consumed deterministically).
        cfg: what to apply.

    Shape:
        coords: ``(k, 2)`` float; returns ``(k, 2)`` float32, all values >= 0.
    """
    c = np.asarray(coords, dtype=np.float64)
    c = c - c.mean(axis=0, keepdims=True)
    if cfg.rotate:
        a = rng.uniform(0.0, 2.0 * np.pi)
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        c = c @ rot.T
    if cfg.flip:
        sign = np.where(rng.random(2) < 0.5, -1.0, 1.0)
        c = c * sign
    lo, hi = cfg.scale
    c = c * rng.uniform(lo, hi, size=2)
    c = c - c.min(axis=0, keepdims=True)
    if cfg.translate > 0:
        c = c + rng.uniform(0.0, cfg.translate, size=2)
    return c.astype(np.float32)


def store_slide_ids(store: Any, slide_ids: Sequence[str] | None) -> list[str]:
    """``slide_ids`` checked against the store's complete slides (all of them when ``None``)."""
    ids = list(store.slide_ids) if slide_ids is None else [str(s) for s in slide_ids]
    if slide_ids is not None:
        known = set(store.slide_ids)
        missing = [s for s in ids if s not in known]
        if missing:
            raise InputError(f"{len(missing)} slide ids are not complete slides of the store, "
                             f"e.g. {missing[:5]}; see TileStore.slide_ids.")
    return ids


@dataclass(frozen=True)
class SlideData:
    """The arrays of one slide that slide SSL needs, in memory.

    Shape:
        features: ``(N, D)`` clean tile features; coords: ``(N, 2)`` float32 grid units;
        views: ``(V, T, D)`` augmented features (may be ``(0, 0, D)`` for inference-only use);
        view_index: ``(V, T)`` int64 index of each view tile into ``features``/``coords``.
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    views: np.ndarray
    view_index: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.features.nbytes + self.coords.nbytes + self.views.nbytes
                   + self.view_index.nbytes)


def _read_slide(store: Any, slide_id: str, *, need_views: bool) -> SlideData:
    rec = store[slide_id]
    feats = np.asarray(rec.features)
    coords = np.asarray(rec.coords)
    if feats.ndim != 2:
        raise StoreFormatError(f"slide '{slide_id}': features must be (n_tiles, dim); got shape "
                               f"{feats.shape}.")
    views = getattr(rec, "views", None)
    vidx = getattr(rec, "view_index", None)
    views = np.zeros((0, 0, feats.shape[1]), feats.dtype) if views is None else np.asarray(views)
    vidx = np.zeros((0, 0), np.int64) if vidx is None else np.asarray(vidx).astype(np.int64)
    if views.size == 0:
        views = np.zeros((0, 0, feats.shape[1]), feats.dtype)
        vidx = np.zeros((0, 0), np.int64)
    if need_views and len(feats):
        if views.ndim != 3 or views.shape[:2] != vidx.shape or views.shape[2] != feats.shape[1]:
            raise StoreFormatError(
                f"slide '{slide_id}': views {views.shape} and view_index {vidx.shape} do not "
                f"match features {feats.shape}; re-run the embedding with views."
            )
        if len(vidx) and (vidx.min() < 0 or vidx.max() >= len(feats)):
            raise StoreFormatError(f"slide '{slide_id}': view_index points outside its "
                                   f"{len(feats)} tiles.")
    if len(feats) and not np.isfinite(feats).all():
        raise InputError(f"slide '{slide_id}' has NaN/inf values in its tile features; "
                         "re-embed it (or drop it from the store) before slide SSL.")
    if need_views and views.size and not np.isfinite(views).all():
        raise InputError(f"slide '{slide_id}' has NaN/inf values in its augmented views; "
                         "re-embed it (or drop it from the store) before slide SSL.")
    attrs = dict(getattr(rec, "attrs", {}) or {})
    return SlideData(slide_id, feats, to_grid_units(coords, attrs), views, vidx)


class SlideBank:
    """Reads the slides of a store once and keeps them in an LRU cache bounded in bytes.

    Construction reads every slide once to validate it (NaN, missing view bank, empty slides)
    and to compute the per-dimension feature mean/std. Slides that fit in ``cache_bytes`` are
    never read again; the others are re-read from zarr on demand (least recently used out first).

    Args:
        store: a :class:`~wsi_ssl.store.TileStore` (anything with ``slide_ids`` and ``[id]``).
        slide_ids: the slides to use (default: all complete slides of the store).
        need_views: require the Giga-SSL augmentation bank (training); ``False`` for inference.
        min_tiles: warn about slides with fewer tiles than this (views sample with replacement).
        cache_bytes: memory budget of the cache.
    """

    def __init__(self, store: Any, slide_ids: Sequence[str] | None = None, *,
                 need_views: bool = True, min_tiles: int = 1,
                 cache_bytes: int = 2 * 1024**3) -> None:
        self.store = store
        self.need_views = need_views
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[str, SlideData] = OrderedDict()
        self._cached_bytes = 0
        self.n_reads = 0
        ids = store_slide_ids(store, slide_ids)
        if not ids:
            raise InputError(f"tile store '{getattr(store, 'path', store)}' has no complete "
                             "slides; embed some slides first (`wsi-ssl embed`).")
        self.slide_ids: list[str] = []
        self.skipped: list[str] = []
        no_views: list[str] = []
        few: list[str] = []
        dim: int | None = None
        total = sq = None
        n_tiles = 0
        for sid in ids:
            data = self._load(sid)
            if len(data.features) == 0:
                self.skipped.append(sid)
                continue
            if dim is None:
                dim = data.features.shape[1]
                total, sq = np.zeros(dim), np.zeros(dim)
            elif data.features.shape[1] != dim:
                raise StoreFormatError(f"slide '{sid}' has {data.features.shape[1]}-d features, "
                                       f"the others {dim}-d; one store holds one encoder.")
            if need_views and data.views.shape[0] == 0:
                no_views.append(sid)
                continue
            t = data.views.shape[1] if need_views else len(data.features)
            if t < min_tiles:
                few.append(f"{sid} ({t})")
            f = data.features.astype(np.float64)
            total += f.sum(0)
            sq += (f * f).sum(0)
            n_tiles += len(f)
            self.slide_ids.append(sid)
        if no_views:
            raise StoreFormatError(
                f"tile store '{getattr(store, 'path', store)}' has no augmentation view bank for "
                f"{len(no_views)} slide(s), e.g. {no_views[:3]}; slide SSL trains on the Giga-SSL "
                "shared-augmentation views: re-run the embedding with views "
                "(`wsi-ssl embed ... --views N`, or embed_slides(..., views=N))."
            )
        if self.skipped:
            warnings.warn(f"skipping {len(self.skipped)} slide(s) without tiles: "
                          f"{self.skipped[:10]}", UserWarning, stacklevel=3)
        if few:
            warnings.warn(f"{len(few)} slide(s) have fewer than {min_tiles} tiles per view, "
                          f"views sample them with replacement: {few[:10]}", UserWarning,
                          stacklevel=3)
        if not self.slide_ids:
            raise InputError(f"tile store '{getattr(store, 'path', store)}': every selected "
                             "slide is empty; nothing to use.")
        self.dim = int(dim)  # type: ignore[arg-type]
        mean = total / n_tiles
        var = np.maximum(sq / n_tiles - mean * mean, 0.0)
        self.mean = mean.astype(np.float32)
        self.std = np.sqrt(var + 1e-6).astype(np.float32)

    def _load(self, sid: str) -> SlideData:
        data = _read_slide(self.store, sid, need_views=self.need_views)
        self.n_reads += 1
        if data.nbytes <= self.cache_bytes:
            self._cache[sid] = data
            self._cached_bytes += data.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return data

    def __len__(self) -> int:
        return len(self.slide_ids)

    def get(self, sid: str) -> SlideData:
        """The arrays of slide ``sid`` (from the cache, else read from the store)."""
        data = self._cache.get(sid)
        if data is not None:
            self._cache.move_to_end(sid)
            return data
        return self._load(sid)

    def sample_views(self, batch: Sequence[str], rng: np.random.Generator, k: int,
                     coord_aug: CoordAugment | None, n_views: int = 2
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``n_views`` random views of each slide of ``batch``.

        A view picks one augmented version of the slide at random and samples ``k`` of its tiles
        with replacement (Giga-SSL); their coordinates are augmented by ``coord_aug``.

        Shape:
            returns ``x`` float32 ``(n_views, B, k, D)`` and ``coords`` float32
            ``(n_views, B, k, 2)``.
        """
        b = len(batch)
        x = np.empty((n_views, b, k, self.dim), np.float32)
        c = np.empty((n_views, b, k, 2), np.float32)
        for j, sid in enumerate(batch):
            d = self.get(sid)
            n_versions, t = d.view_index.shape
            for v in range(n_views):
                ver = int(rng.integers(n_versions))
                idx = rng.integers(0, t, size=k)
                x[v, j] = d.views[ver, idx]
                xy = d.coords[d.view_index[ver, idx]]
                c[v, j] = augment_coords(xy, rng, coord_aug) if coord_aug is not None else xy
        return x, c
