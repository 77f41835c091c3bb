"""``wsi-ssl tile``: tissue grids + QC pictures for many slides."""

from __future__ import annotations

import argparse

from wsi_ssl.cli._embed import add_config_options
from wsi_ssl.tiling import grid_settings, tile_slides

HELP = "find tissue and cut MPP-exact tile grids (coords CSV + QC PNG per slide)"
DESCRIPTION = (
    "Tile slides at an exact physical resolution. SLIDES are files, directories or globs. "
    "Writes per slide OUT/<slide_id>/coords.csv (level-0 x, y), grid.json and qc.png, plus "
    "OUT/tiling_report.csv. --encoder NAME takes --mpp / --tile-size from the encoder's preset "
    "exactly as `wsi-ssl embed --encoder NAME` does, so both cut the same grid. Slides that "
    "fail are reported and the others go on; the exit code is 1 when any slide failed."
)

#: the EmbedConfig fields ``wsi-ssl tile`` takes as options (defaults: the EmbedConfig fields)
TILE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("mpp", "target resolution of the tiles, µm/px (default: the --encoder preset's, else "
            "{default})"),
    ("tile_size", "tile edge in pixels at --mpp (default: the --encoder preset's, else "
                  "{default})"),
    ("min_tissue", "minimal tissue fraction of a kept tile"),
    ("overlap", "pixels shared by neighbouring tiles"),
    ("assume_mpp", "the slide's own µm/px for slides WITHOUT MPP metadata (never overrides "
                   "the file)"),
    ("backend", "slide reader backend"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("slides", nargs="+", metavar="SLIDES", help="slide files, folders or globs")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--encoder", default=None,
                        help="cut the grid of this encoder: its preset's --mpp / --tile-size, "
                        "as `wsi-ssl embed --encoder` does")
    add_config_options(parser, TILE_OPTIONS)
    parser.add_argument("--no-plot", action="store_true", help="skip the QC PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo slides already tiled with the same settings")


def run(args: argparse.Namespace) -> int:
    mpp, tile_size, _ = grid_settings(args.encoder, mpp=args.mpp, tile_size=args.tile_size)
    report = tile_slides(args.slides, args.out, mpp=mpp, tile_size=tile_size,
                         min_tissue=args.min_tissue, assume_mpp=args.assume_mpp,
                         backend=args.backend, overlap=args.overlap, plot=not args.no_plot,
                         overwrite=args.overwrite)
    print(report.format_table())
    return 1 if report.n_failed else 0
