"""``wsi-ssl store``: maintenance of a tile store (``upgrade`` to the current format, ``index``)."""

from __future__ import annotations

import argparse

HELP = "tile-store maintenance: upgrade an older store in place, rebuild its slide index"
DESCRIPTION = (
    "wsi-ssl store upgrade PATH rewrites a format-1 tile store as format 2 in place, slide by "
    "slide, under the writer lock, re-verifying every checksum; a killed upgrade resumes when "
    "rerun. wsi-ssl store index --rebuild PATH rebuilds the slide index from a scan of the slide "
    "folders (same as `wsi-ssl info PATH --rescan`).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="store_command", metavar="{upgrade,index}")
    sub.required = True
    up = sub.add_parser("upgrade", help="rewrite a format-1 store as format 2, in place")
    up.add_argument("path", help="the tile store (.zarr folder)")
    up.add_argument("--wait", action="store_true",
                    help="queue behind another writer instead of failing at once")
    up.add_argument("--drop-damaged", action="store_true",
                    help="delete damaged format-1 slides (missing chunks, altered bytes) instead "
                    "of stopping; re-embed them afterwards")
    ix = sub.add_parser("index", help="rebuild the slide index from the slide folders")
    ix.add_argument("path", help="the tile store (.zarr folder)")
    ix.add_argument("--rebuild", action="store_true", required=True,
                    help="scan every slide folder and rewrite slides.index")


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.store import TileStore, upgrade_store  # lazy: keeps wsi-ssl --help light

    if args.store_command == "upgrade":
        rep = upgrade_store(args.path, wait=bool(args.wait), drop_damaged=bool(args.drop_damaged))
        if rep.from_version == 2 and not (rep.converted or rep.already):
            print(f"{rep.store}: format 2 already, nothing to do")
            return 0
        print(f"upgraded       {rep.store} from format {rep.from_version} to 2")
        print(f"converted      {len(rep.converted)} slides (checksums re-verified"
              + (f"; {len(rep.unchecked)} had none" if rep.unchecked else "") + ")")
        if rep.already:
            print(f"resumed        {len(rep.already)} slides were converted by an earlier run")
        for sid, why in sorted(rep.dropped.items()):
            print(f"  dropped: {sid:<30} {why}  (re-embed it)")
        for sid, why in sorted(rep.unreadable.items()):
            print(f"  unreadable: {sid:<27} {why}  (restore its zarr.json, rerun the upgrade)")
        return 0
    store = TileStore(args.path, mode="a")
    ids = store.rescan()
    print(f"index          {store.path}: {len(ids)} complete slides indexed")
    return 0
