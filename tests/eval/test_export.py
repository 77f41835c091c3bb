"""QuPath GeoJSON export: valid GeoJSON (schema), readable with shapely, tiles on the very pixels
``plot_grid`` draws, and the per-tile measurements."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from tests._inspect_cohort import inspect_cohort
from wsi_ssl.cli import main
from wsi_ssl.errors import InputError
from wsi_ssl.eval import export_geojson, tile_clusters
from wsi_ssl.tiling import detect_tissue, open_slide, plot_grid, tile_grid

shapely = pytest.importorskip("shapely", reason="shapely is in the dev extra")
from shapely.geometry import shape  # noqa: E402

_POINT = {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
_RING = {"type": "array", "items": _POINT, "minItems": 4}
#: GeoJSON (RFC 7946) FeatureCollection of Polygons, with QuPath's properties
SCHEMA = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {"type": "array", "items": {
            "type": "object",
            "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"},
                "geometry": {"type": "object", "required": ["type", "coordinates"],
                             "properties": {"type": {"const": "Polygon"},
                                            "coordinates": {"type": "array", "items": _RING,
                                                            "minItems": 1}}},
                "properties": {"type": "object", "required": ["objectType", "classification"],
                               "properties": {
                                   "objectType": {"enum": ["annotation", "detection"]},
                                   "classification": {
                                       "type": "object", "required": ["name", "color"],
                                       "properties": {"name": {"type": "string"},
                                                      "color": {"type": "array", "minItems": 3,
                                                                "maxItems": 3}}},
                                   "measurements": {"type": "object",
                                                    "additionalProperties": {"type": "number"}}}},
            }}},
    },
}


def _load(path):
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, SCHEMA)
    for f in doc["features"]:
        for ring in f["geometry"]["coordinates"]:
            assert ring[0] == ring[-1]  # closed rings
    return doc


def _by_type(doc, kind):
    return [f for f in doc["features"] if f["properties"]["objectType"] == kind]


def test_grid_export_lands_on_plot_grid_pixels(synthetic_slide, tmp_path):
    res = export_geojson(synthetic_slide, tmp_path / "s.geojson", mpp=0.5, tile_size=224)
    doc = _load(res.path)
    with open_slide(synthetic_slide) as slide:
        tissue = detect_tissue(slide)
        grid = tile_grid(slide, mpp=0.5, tile_size=224, tissue=tissue)
        fig = plot_grid(slide, grid, tissue)
        thumb_w = fig.axes[0].get_xlim()[1] + 0.5
        sx = thumb_w / slide.dimensions[0]
        w0, h0 = slide.dimensions
    tiles = _by_type(doc, "detection")
    assert res.n_detections == len(tiles) == len(grid) > 20
    bounds = np.array([shape(f["geometry"]).bounds for f in tiles])  # minx, miny, maxx, maxy
    np.testing.assert_allclose(bounds[:, :2], grid.coords, atol=0.01)
    np.testing.assert_allclose(bounds[:, 2:] - bounds[:, :2], grid.size_level0, atol=0.01)
    # the boxes plot_grid draws (thumbnail px) are these level-0 boxes times the thumbnail scale
    segs = np.asarray(fig.axes[0].collections[-1].get_segments())
    drawn = np.stack([segs[:, :, 0].min(1), segs[:, :, 1].min(1)], 1) / sx
    np.testing.assert_allclose(drawn, bounds[:, :2], rtol=1e-6, atol=1e-6 / sx)
    tf = np.array([f["properties"]["measurements"]["tissue_fraction"] for f in tiles])
    np.testing.assert_allclose(tf, grid.tissue_fraction, atol=1e-5)
    # tissue annotations: valid polygons that cover the tissue the mask found (and the tiles)
    ann = [shape(f["geometry"]) for f in _by_type(doc, "annotation")]
    assert res.n_annotations == len(ann) >= 1 and all(p.is_valid for p in ann)
    area = sum(p.area for p in ann)
    assert area / (w0 * h0) == pytest.approx(tissue.fraction, rel=0.05)
    from shapely.geometry import box
    from shapely.ops import unary_union

    tissue_union = unary_union(ann)
    centres = [box(*b).centroid for b in bounds[tf > 0.9]]
    assert np.mean([tissue_union.contains(c) for c in centres]) > 0.95


def test_store_export_has_scores_and_clusters(tmp_path_factory, tmp_path):
    cohort, store = inspect_cohort(tmp_path_factory)
    sid = store.slide_ids[3]
    path = cohort.slides_dir / f"{sid}.tif"
    # a made-up score per tile: tile index, so the order of detections can be checked
    from wsi_ssl.eval import HeatmapResult

    rec = store[sid]
    scores = HeatmapResult(slide_id=sid, coords=rec.coords, scores=np.arange(len(rec.coords),
                                                                             dtype=np.float32),
                           kind="attention", meaning="index", tile_size_level0=112.0,
                           stride_level0=112.0)
    res = export_geojson(path, tmp_path / "t.geojson", store=store, scores=scores, n_clusters=3)
    assert res.measurements == ("tissue_fraction", "heatmap_score", "cluster")
    doc = _load(res.path)
    tiles = _by_type(doc, "detection")
    assert len(tiles) == len(rec.coords)
    m = [f["properties"]["measurements"] for f in tiles]
    assert [v["heatmap_score"] for v in m] == list(range(len(tiles)))
    clusters = tile_clusters(np.asarray(rec.features, np.float32), 3)
    assert [v["cluster"] for v in m] == clusters.tolist()
    assert {f["properties"]["classification"]["name"] for f in tiles} == {
        "Cluster 0", "Cluster 1", "Cluster 2"}
    corners = np.array([shape(f["geometry"]).bounds[:2] for f in tiles])
    np.testing.assert_allclose(corners, rec.coords)
    assert min(v["tissue_fraction"] for v in m) > 0.2  # embedded tiles are tissue tiles


def test_export_cli_and_errors(tmp_path_factory, tmp_path, capsys):
    cohort, store = inspect_cohort(tmp_path_factory)
    sid = store.slide_ids[0]
    out = tmp_path / "cli.geojson"
    rc = main(["export-geojson", str(cohort.slides_dir / f"{sid}.tif"), "--store",
               str(store.path), "--clusters", "4", "--out", str(out)])
    assert rc == 0
    assert "QuPath" in capsys.readouterr().out
    doc = _load(out)
    assert len(_by_type(doc, "detection")) == len(store[sid].coords)
    with pytest.raises(InputError, match="store="):
        export_geojson(cohort.slides_dir / f"{sid}.tif", tmp_path / "x.geojson", n_clusters=3)
