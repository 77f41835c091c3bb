"""QuPath export: tissue contours as annotations, tiles as detections with measurements (GeoJSON).

QuPath (``File > Import objects`` or drag and drop, 0.4+) reads a GeoJSON ``FeatureCollection``
whose features carry ``properties.objectType`` (``"annotation"`` / ``"detection"``),
``properties.classification`` ``{"name", "color"}`` and ``properties.measurements`` (a name ->
number map). Coordinates are **level-0 pixels** ``(x, y)`` of the slide, as QuPath expects; a tile
detection is the square ``[x, x + size] x [y, y + size]`` that :func:`~wsi_ssl.tiling.plot_grid`
draws.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl._utils import atomic_write_bytes, sanitize_id
from wsi_ssl.errors import InputError
from wsi_ssl.eval._clusters import tile_clusters
from wsi_ssl.eval._heatmap import read_slide_tiles, tile_geometry, tile_scores
from wsi_ssl.tiling import EmbedConfig, detect_tissue, open_slide, tile_grid

__all__ = ["GeoJSONExport", "export_geojson", "tissue_polygons"]

logger = logging.getLogger(__name__)

_TISSUE_COLOR = [0, 170, 0]
_TILE_COLOR = [31, 95, 255]


@dataclass(frozen=True, kw_only=True)
class GeoJSONExport:
    """What :func:`export_geojson` wrote.

    Attributes:
        path: the ``.geojson`` file.
        slide_id: the slide.
        n_annotations: tissue polygons written.
        n_detections: tiles written.
        measurements: the per-tile measurement names.
    """

    path: Path
    slide_id: str
    n_annotations: int
    n_detections: int
    measurements: tuple[str, ...]


def tissue_polygons(tissue: Any) -> list[list[np.ndarray]]:
    """Outlines of a :class:`~wsi_ssl.tiling.TissueMask` in level-0 pixels.

    Returns:
        One entry per tissue piece: ``[outer ring, hole rings...]``, each a closed ``(n, 2)``
        float array of level-0 ``(x, y)`` (mask pixel centres, boundaries half-way between).
    """
    import contourpy  # lazy: contourpy only for GeoJSON export

    mask = np.pad(np.asarray(tissue.mask, np.float64), 1)
    if not mask.any():
        return []
    sx, sy = tissue.downsample
    xs = (np.arange(mask.shape[1]) - 1 + 0.5) * sx
    ys = (np.arange(mask.shape[0]) - 1 + 0.5) * sy
    gen = contourpy.contour_generator(xs, ys, mask, fill_type=contourpy.FillType.OuterOffset)
    points, offsets = gen.filled(0.5, 2.0)
    polys = []
    for pts, off in zip(points, offsets, strict=True):
        rings = []
        for a, b in zip(off[:-1], off[1:], strict=True):
            ring = np.asarray(pts[a:b], np.float64)
            if len(ring) >= 3 and not np.array_equal(ring[0], ring[-1]):
                ring = np.vstack([ring, ring[:1]])
            if len(ring) >= 4:
                rings.append(ring)
        if rings:
            polys.append(rings)
    return polys


def _feature(rings: list[np.ndarray], object_type: str, name: str, color: list[int],
             measurements: dict[str, float], decimals: int = 1) -> dict[str, Any]:
    coords = [np.round(r, decimals).tolist() for r in rings]
    return {"type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": object_type,
                           "classification": {"name": name, "color": color},
                           "isLocked": object_type == "annotation",
                           "measurements": measurements}}


def export_geojson(slide_path: str | os.PathLike, out_path: str | os.PathLike, *,
                   store: Any = None, slide_id: str | None = None, model: Any = None,
                   kind: Literal["attention", "tile_logit"] = "attention",
                   scores: Any = None, n_clusters: int | None = None, seed: int = 0,
                   mpp: float = EmbedConfig.default("mpp"),
                   tile_size: int = EmbedConfig.default("tile_size"),
                   min_tissue: float = EmbedConfig.default("min_tissue"),
                   slide_mpp: float | None = None) -> GeoJSONExport:
    """Write a QuPath-readable GeoJSON of one slide: tissue annotations + tile detections.

    Tiles come from ``store`` (the tiles that were embedded) or, without a store, from a fresh
    :func:`~wsi_ssl.tiling.tile_grid` at ``mpp`` / ``tile_size`` / ``min_tissue``.

    Args:
        slide_path: the slide file.
        out_path: the ``.geojson`` to write.
        store: a :class:`~wsi_ssl.store.TileStore` (or path) holding the slide's tiles.
        slide_id: its id in the store (default: the sanitised file stem).
        model: a SlideSSL (or its directory) or fitted MILClassifier: adds each tile's
            ``heatmap_score`` (see :func:`~wsi_ssl.eval.heatmap`; needs ``store``).
        kind: the heatmap score kind for ``model``.
        scores: a :class:`~wsi_ssl.eval.HeatmapResult` already computed (instead of ``model``).
        n_clusters: adds each tile's k-means ``cluster`` id (needs ``store``).
        seed: k-means seed.
        mpp, tile_size, min_tissue: the grid when no store is given.
        slide_mpp: the slide's µm/px when its file has none.

    Measurements per tile: ``tissue_fraction`` always; ``heatmap_score`` and ``cluster`` when
    asked for.

    Returns:
        A :class:`GeoJSONExport`.
    """
    sid = slide_id or sanitize_id(Path(slide_path).stem)
    if (model is not None or n_clusters) and store is None:
        raise InputError("heatmap scores (model=) and clusters (n_clusters=) come from a tile "
                         "store: pass store= (--store) with the slide's embedded tiles.")
    with open_slide(slide_path, slide_mpp=slide_mpp) as slide:
        tissue = detect_tissue(slide)
        if store is None:
            grid = tile_grid(slide, mpp=mpp, tile_size=tile_size, min_tissue=min_tissue,
                             tissue=tissue)
            coords, size = np.asarray(grid.coords, np.int64), float(grid.size_level0)
            meas = {"tissue_fraction": np.asarray(grid.tissue_fraction, np.float64)}
        else:
            coords, size, meas = _store_tiles(store, sid, tissue, model=model, kind=kind,
                                              scores=scores, n_clusters=n_clusters, seed=seed)
    features = _tissue_features(tissue) + _tile_features(coords, size, meas)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"type": "FeatureCollection", "features": features}
    atomic_write_bytes(out, json.dumps(doc, separators=(",", ":")).encode("utf-8"))
    n_ann = sum(1 for f in features if f["properties"]["objectType"] == "annotation")
    logger.info("wrote %d tissue annotations and %d tile detections to %s", n_ann,
                len(features) - n_ann, out)
    return GeoJSONExport(path=out, slide_id=sid, n_annotations=n_ann,
                         n_detections=len(features) - n_ann, measurements=tuple(meas))


def _store_tiles(store: Any, sid: str, tissue: Any, *, model: Any, kind: str, scores: Any,
                 n_clusters: int | None, seed: int
                 ) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """The slide's tiles in the store: level-0 ``(x, y)``, their size, and the measurements
    (tissue fraction; heatmap score and cluster when asked for)."""
    feats, coords, attrs = read_slide_tiles(store, sid)
    _, size = tile_geometry(coords, attrs)
    boxes = np.hstack([coords, coords + size]).astype(np.float64)
    meas = {"tissue_fraction": tissue.region_fractions(boxes).astype(np.float64)}
    if model is not None or scores is not None:
        if scores is None:
            scores = tile_scores(store, sid, model, kind=kind)
        if not np.array_equal(np.asarray(scores.coords), coords):
            raise InputError(f"scores= are for other tiles than slide {sid!r} of the "
                             "store; compute them from the same store.")
        meas["heatmap_score"] = np.asarray(scores.scores, np.float64)
    if n_clusters:
        meas["cluster"] = tile_clusters(feats, n_clusters, seed=seed).astype(np.float64)
    return coords, size, meas


def _tissue_features(tissue: Any) -> list[dict[str, Any]]:
    """One locked ``Tissue`` annotation per tissue polygon (with its holes)."""
    features = []
    for rings in tissue_polygons(tissue):
        from_area = _ring_area(rings[0]) - sum(_ring_area(r) for r in rings[1:])
        features.append(_feature(rings, "annotation", "Tissue", _TISSUE_COLOR,
                                 {"area_px2": round(float(from_area), 1)}))
    return features


def _tile_features(coords: np.ndarray, size: float, meas: dict[str, np.ndarray]
                   ) -> list[dict[str, Any]]:
    """One detection per tile (``Cluster k`` when clustered, else ``Tile``) with its
    measurements."""
    features = []
    names = tuple(meas)
    for i, (x, y) in enumerate(np.asarray(coords, np.float64)):
        ring = np.array([[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]])
        m = {n: (int(meas[n][i]) if n == "cluster" else round(float(meas[n][i]), 6))
             for n in names}
        name = f"Cluster {int(meas['cluster'][i])}" if "cluster" in meas else "Tile"
        features.append(_feature([ring], "detection", name, _TILE_COLOR, m, decimals=2))
    return features


def _ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
