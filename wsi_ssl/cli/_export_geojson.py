"""``wsi-ssl export-geojson``: tissue and tiles of a slide as QuPath objects."""

from __future__ import annotations

import argparse

from wsi_ssl.tiling import EmbedConfig

HELP = "tissue contours (annotations) + tiles (detections, with measurements) -> QuPath GeoJSON"
DESCRIPTION = (
    "Writes a GeoJSON FeatureCollection in level-0 pixel coordinates that QuPath imports "
    "(File > Import objects, or drag and drop): the tissue outline as annotations and every tile "
    "as a detection with measurements tissue_fraction, heatmap_score (--model) and cluster "
    "(--clusters K). Tiles come from --store, or from a fresh grid at --mpp/--tile-size."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", metavar="SLIDE", help="the slide file")
    p.add_argument("--out", required=True, metavar="FILE.geojson", help="output file")
    p.add_argument("--store", default=None, help="tile store (zarr) holding the slide's tiles")
    p.add_argument("--slide-id", default=None, help="the slide's id in the store "
                   "(default: the file name without extension)")
    p.add_argument("--model", default=None, metavar="MODEL_DIR",
                   help="slide-SSL model directory: adds each tile's attention (heatmap_score)")
    p.add_argument("--clusters", type=int, default=None, metavar="K",
                   help="adds each tile's k-means cluster id (of its features in --store)")
    p.add_argument("--mpp", type=float, default=EmbedConfig.default("mpp"),
                   help="target µm/px of the tiles without --store")
    p.add_argument("--tile-size", type=int, default=EmbedConfig.default("tile_size"),
                   help="tile size (px) without --store")
    p.add_argument("--min-tissue", type=float, default=EmbedConfig.default("min_tissue"),
                   help="minimum tissue fraction of a tile without --store")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="the slide's own µm/px when its file has none")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import export_geojson  # lazy: keeps wsi-ssl --help light

    res = export_geojson(args.slide, args.out, store=args.store, slide_id=args.slide_id,
                         model=args.model, n_clusters=args.clusters, mpp=args.mpp,
                         tile_size=args.tile_size, min_tissue=args.min_tissue,
                         slide_mpp=args.assume_mpp)
    print(f"{res.slide_id}: {res.n_annotations} tissue annotations, {res.n_detections} tile "
          f"detections (measurements: {', '.join(res.measurements)})")
    print(f"wrote {res.path}; open the slide in QuPath and drag the file onto it")
    return 0
