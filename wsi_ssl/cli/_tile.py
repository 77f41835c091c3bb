"""``wsi-ssl tile``: tissue grids + QC pictures for many slides."""

from __future__ import annotations

import argparse

HELP = "find tissue and cut MPP-exact tile grids (coords CSV + QC PNG per slide)"
DESCRIPTION = (
    "Tile slides at an exact physical resolution. SLIDES are files, directories or globs. "
    "Writes per slide OUT/<slide_id>/coords.csv (level-0 x, y), grid.json and qc.png, plus "
    "OUT/tiling_report.csv. Slides that fail are reported and the others go on; the exit code is "
    "1 when any slide failed."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files, folders or globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mpp", type=float, default=0.5, help="target µm/px of the tiles")
    parser.add_argument("--tile-size", type=int, default=224, help="tile edge in pixels")
    parser.add_argument("--min-tissue", type=float, default=0.25,
                        help="minimal tissue fraction of a kept tile")
    parser.add_argument("--overlap", type=int, default=0, help="pixels shared by neighbouring tiles")
    parser.add_argument("--assume-mpp", type=float, default=None,
                        help="µm/px for slides WITHOUT MPP metadata (never overrides the file)")
    parser.add_argument("--backend", default="auto",
                        choices=["auto", "tiffslide", "openslide", "tiatoolbox"])
    parser.add_argument("--no-plot", action="store_true", help="skip the QC PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo slides already tiled with the same settings")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.tiling import tile_slides

    report = tile_slides(args.slides, args.out, mpp=args.mpp, tile_size=args.tile_size,
                         min_tissue=args.min_tissue, assume_mpp=args.assume_mpp,
                         backend=args.backend, overlap=args.overlap, plot=not args.no_plot,
                         overwrite=args.overwrite)
    print(report.format_table())
    return 1 if report.n_failed else 0
