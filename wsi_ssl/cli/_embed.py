"""``wsi-ssl embed``: slides -> tile embeddings (+ the Giga-SSL view bank) in a zarr TileStore."""

from __future__ import annotations

import argparse

HELP = "embed the tissue tiles of slides into a resumable zarr tile store (dask-parallel)"
DESCRIPTION = (
    "Tile every slide at --mpp, embed the tiles with --encoder (a registered name, any timm "
    "architecture with --weights, or a .safetensors checkpoint of `wsi-ssl pretrain-tiles`), and "
    "optionally --views augmented versions of --view-tiles tiles each (the Giga-SSL bank used by "
    "`wsi-ssl pretrain-slides`). --mpp / --tile-size default to the encoder preset's. One task "
    "per slide: in this process when a cluster cannot pay off (one slide, one worker, one GPU), "
    "else on a local dask cluster (one worker per GPU) or --scheduler. "
    "Rerunning the same command skips complete slides and redoes interrupted ones. The run holds "
    "the store's writer lock: a second writer fails at once naming this one (or queues with "
    "--wait). --repair re-embeds the slides that `wsi-ssl info STORE --verify` finds damaged. "
    "Exits 1 when any slide failed (the failures are recorded in the store)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("slides", nargs="*", help="slide files, folders or glob patterns")
    p.add_argument("--store", required=True, help="output tile store (a .zarr folder)")
    p.add_argument("--encoder", required=True,
                   help="encoder name (see `wsi-ssl info --encoders`), timm name or checkpoint")
    p.add_argument("--weights", default=None, help="local weights (.safetensors or .pth)")
    p.add_argument("--manifest", default=None,
                   help="CSV with a 'path' column and optional 'slide_id', 'mpp' columns")
    p.add_argument("--mpp", type=float, default=None,
                   help="target resolution, µm/px (default: the encoder preset's, else 0.5)")
    p.add_argument("--tile-size", type=int, default=None,
                   help="tile edge in pixels at --mpp (default: the encoder preset's, else 224)")
    p.add_argument("--min-tissue", type=float, default=0.25, help="min tissue fraction per tile")
    p.add_argument("--views", type=int, default=0,
                   help="augmented versions per slide (Giga-SSL bank; paper: 50; 0 = none)")
    p.add_argument("--view-tiles", type=int, default=256, help="tiles per augmented version")
    p.add_argument("--augment", default="histo", help="augmentation preset: histo or none")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per encoder call")
    p.add_argument("--assume-mpp", type=float, default=None,
                   help="µm/px for slides without MPP metadata (recorded as assumed)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="storage dtype of the features")
    p.add_argument("--device", default="auto", help="encoder device on each worker")
    p.add_argument("--scheduler", default=None,
                   help="dask scheduler address (tcp://host:port); default: a local cluster; "
                   "'sync' runs in this process")
    p.add_argument("--workers", type=int, default=None, help="local cluster worker processes")
    p.add_argument("--seed", type=int, default=0, help="seed of the view sampling")
    p.add_argument("--overwrite", action="store_true", help="redo slides that are complete")
    p.add_argument("--wait", action="store_true",
                   help="if another process is writing the store, wait for it instead of failing")
    p.add_argument("--repair", action="store_true",
                   help="re-embed the slides whose chunks are missing or altered (see `wsi-ssl "
                   "info STORE --verify`), with the settings they were made with")


def run(args: argparse.Namespace) -> int:
    import logging

    from wsi_ssl.errors import ConfigError
    from wsi_ssl.tiling import embed_slides

    if not args.slides and not args.manifest and not args.repair:
        raise ConfigError("give slide paths or --manifest CSV (or --repair).")
    if getattr(args, "verbose", 0) < 2:  # dask's own INFO chatter only with -vv
        for name in ("distributed", "distributed.scheduler", "distributed.nanny",
                     "distributed.core", "distributed.http.proxy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    report = embed_slides(
        args.slides or None, args.encoder, args.store, weights=args.weights, mpp=args.mpp,
        tile_size=args.tile_size,
        views=args.views, view_tiles=args.view_tiles, augment=args.augment,
        batch_size=args.batch_size, min_tissue=args.min_tissue, seed=args.seed,
        assume_mpp=args.assume_mpp, manifest=args.manifest, dtype=args.dtype,
        device=args.device, client=args.scheduler, n_workers=args.workers,
        overwrite=args.overwrite, wait=args.wait, repair=args.repair,
    )
    print(f"store     {report.store}")
    print(f"embedded  {len(report.done)} slides, {report.n_tiles} tiles + "
          f"{report.n_view_tiles} view tiles in {report.seconds:.1f} s "
          f"({report.tiles_per_second:.0f} tiles/s)")
    print(f"skipped   {len(report.skipped)} slides already complete")
    if report.plan:
        print(f"ran       {report.plan}")
    if report.failed:
        print(f"FAILED    {len(report.failed)} slides:")
        for sid, path, err in report.failed:
            print(f"  {sid:<30} {path}\n    {err}")
        print("fix them (e.g. --assume-mpp for slides without MPP) and rerun the same command.")
        return 1
    return 0
