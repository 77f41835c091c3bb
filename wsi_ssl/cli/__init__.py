"""The ``wsi-ssl`` command. Each subcommand lives in its own module ``wsi_ssl.cli._<name>``
which defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``; it parses
and calls exactly one library function. Library imports happen inside ``run`` so that
``wsi-ssl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from wsi_ssl._version import __version__
from wsi_ssl.errors import WsiSslError

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

#: subcommand name -> module (in pipeline order)
SUBCOMMANDS: dict[str, str] = {
    "demo": "wsi_ssl.cli._demo",
    "tile": "wsi_ssl.cli._tile",
    "embed": "wsi_ssl.cli._embed",
    "info": "wsi_ssl.cli._info",
    "pretrain-tiles": "wsi_ssl.cli._pretrain_tiles",
    "pretrain-slides": "wsi_ssl.cli._pretrain_slides",
    "encode-slides": "wsi_ssl.cli._encode_slides",
    "probe": "wsi_ssl.cli._probe",
    "survival": "wsi_ssl.cli._survival",
    "encoders": "wsi_ssl.cli._encoders",
    "heatmap": "wsi_ssl.cli._heatmap",
    "similar": "wsi_ssl.cli._similar",
    "retrieval-report": "wsi_ssl.cli._retrieval_report",
    "export-geojson": "wsi_ssl.cli._export_geojson",
    "store": "wsi_ssl.cli._store",
    "cluster-check": "wsi_ssl.cli._cluster_check",
    "compare": "wsi_ssl.cli._compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-ssl",
        description="Whole-slide images to compact slide embeddings "
        "(tiling -> tile embeddings -> slide SSL -> probes).",
    )
    parser.add_argument("--version", action="version", version=f"wsi-ssl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as err:  # a subcommand not built yet
            if err.name != modname:
                raise
            continue
        p = sub.add_parser(name, help=mod.HELP.replace("%", "%%"),  # argparse %-formats help
                           description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose < 1:  # dask's INFO chatter (scheduler, nanny, worker start-up) only with -v
        # dask applies its own logging config when distributed is first imported, in this
        # process and in every worker process: tell it through the environment, before that
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except WsiSslError as err:
        print(f"wsi-ssl {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"wsi-ssl {args.command}: interrupted; rerun the same command to resume.",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
