"""Tile-feature clusters of one slide as a coloured map: a QC picture before any model exists.

k-means over the L2-normalised tile features of a slide; every tile gets a cluster id and is
drawn in its cluster's colour over the thumbnail. Tissue types, folds, pen, blur or background
that the tile encoder separates show up as coherent patches. Coordinates are level-0 pixels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import sanitize_id
from wsi_ssl.errors import ConfigError
from wsi_ssl.eval._heatmap import read_slide_tiles, save_tile_map, tile_geometry

__all__ = ["ClusterMapResult", "tile_clusters", "cluster_map"]


@dataclass(frozen=True, kw_only=True)
class ClusterMapResult:
    """Cluster id of every tile of one slide.

    Attributes:
        slide_id: the slide.
        coords: ``int64 (N, 2)`` level-0 ``(x, y)`` top-left of each tile.
        clusters: ``int64 (N,)`` cluster id in ``0 .. n_clusters - 1`` (0 = the largest cluster).
        n_clusters: the number of clusters.
        stride_level0: level-0 pixels between neighbouring tiles.
        tile_size_level0: tile edge in level-0 pixels.
        figure: the PNG written, or None; csv: ``slide_id, x, y, cluster``, or None.
    """

    slide_id: str
    coords: np.ndarray
    clusters: np.ndarray
    n_clusters: int
    stride_level0: float
    tile_size_level0: float
    figure: Path | None = None
    csv: Path | None = None

    def to_frame(self):
        """A DataFrame with columns ``slide_id, x, y, cluster``."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        return pd.DataFrame({"slide_id": self.slide_id, "x": self.coords[:, 0],
                             "y": self.coords[:, 1], "cluster": self.clusters})


def tile_clusters(features: np.ndarray, n_clusters: int = 6, *, seed: int = 0) -> np.ndarray:
    """k-means cluster ids of tile features, relabelled so that 0 is the largest cluster.

    Shape:
        features ``(N, D)`` -> ``int64 (N,)``.
    """
    from sklearn.cluster import KMeans  # lazy: scikit-learn loads on the first fit, not on import

    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) \
            or n_clusters < 2:
        raise ConfigError(f"n_clusters={n_clusters!r} must be an integer >= 2.")
    x = np.asarray(features, np.float64)
    k = min(int(n_clusters), len(x))
    if k < 2:
        return np.zeros(len(x), np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    lab = KMeans(n_clusters=k, n_init=4, random_state=int(seed)).fit_predict(x)
    order = np.argsort(-np.bincount(lab, minlength=k), kind="stable")
    remap = np.empty(k, np.int64)
    remap[order] = np.arange(k)
    return remap[lab]


def cluster_map(slide_path: str | os.PathLike, store: Any, *, slide_id: str | None = None,
                n_clusters: int = 6, seed: int = 0, out_dir: str | os.PathLike | None = None,
                slide_mpp: float | None = None) -> ClusterMapResult:
    """k-means clusters of one slide's tile features, drawn over its thumbnail.

    Args:
        slide_path: the slide file (thumbnail and tissue outline).
        store: the :class:`~wsi_ssl.store.TileStore` (or path) holding its tiles.
        slide_id: its id in the store (default: the sanitised file stem).
        n_clusters: k of k-means.
        seed: k-means seed.
        out_dir: where ``{slide_id}_clusters.png`` and ``.csv`` go; None = nothing written.
        slide_mpp: the slide's own µm/px when its file has none.

    Returns:
        A :class:`ClusterMapResult`.
    """
    sid = slide_id or sanitize_id(Path(slide_path).stem)
    feats, coords, attrs = read_slide_tiles(store, sid)
    stride, size = tile_geometry(coords, attrs)
    lab = tile_clusters(feats, n_clusters, seed=seed)
    res = ClusterMapResult(slide_id=sid, coords=coords, clusters=lab,
                           n_clusters=int(lab.max()) + 1, stride_level0=stride,
                           tile_size_level0=size)
    if out_dir is None:
        return res
    counts = np.bincount(lab)
    title = (f"{sid}: k-means of {len(lab)} tile features into {res.n_clusters} clusters\n"
             f"(tiles per cluster: {', '.join(map(str, counts))}); green line = tissue outline")
    png, csv = save_tile_map(slide_path, sid, res.to_frame(), lab, stride=stride,
                             out_dir=out_dir, suffix="clusters", title=title, label="cluster id",
                             categorical=True, slide_mpp=slide_mpp)
    return replace(res, figure=png, csv=csv)
