"""``wsi-ssl heatmap``: where a trained slide encoder looks, drawn over the slide."""

from __future__ import annotations

import argparse

HELP = "per-tile attention of a slide-SSL model over a slide's thumbnail -> PNG + CSV"
DESCRIPTION = (
    "Runs the attention MIL head of a model trained by `wsi-ssl pretrain-slides` (abmil, "
    "gated_abmil, dsmil, transmil, sparseconv with attention pooling) over every tile of the "
    "slide in the tile store and draws the weights (x uniform: 1 = an average tile) over the "
    "thumbnail with the tissue outline. Writes DIR/<slide_id>_attention.png and .csv "
    "(slide_id, x, y, score; level-0 px)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slide", metavar="SLIDE", help="the slide file")
    p.add_argument("--store", required=True, help="tile store (zarr) holding the slide's tiles")
    p.add_argument("--model", required=True, metavar="MODEL_DIR",
                   help="slide-SSL model directory (wsi-ssl pretrain-slides --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--slide-id", default=None, help="the slide's id in the store "
                   "(default: the file name without extension)")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="µm/px of a slide whose file has none (as given to embed)")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.eval import heatmap  # lazy: keeps `wsi-ssl --help` fast

    res = heatmap(args.slide, args.store, args.model, slide_id=args.slide_id, out_dir=args.out,
                  slide_mpp=args.assume_mpp)
    top = res.top_tiles(5)
    print(f"{res.slide_id}: {len(res)} tiles, {res.meaning}; top 5 tiles (level-0 x, y): "
          + ", ".join(f"({x}, {y})" for x, y in res.coords[top]))
    print(f"wrote {res.figure} and {res.csv}")
    return 0
