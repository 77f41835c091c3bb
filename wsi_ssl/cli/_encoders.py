"""``wsi-ssl encoders``: the tile (and, with --slide, slide) encoders wsi-ssl knows and whether
their weights are here."""

from __future__ import annotations

import argparse

HELP = "list the tile encoders (foundation-model presets) or slide encoders and their weights"
DESCRIPTION = (
    "One line per encoder: name, embedding dimension, µm/px and tile size it was trained at, "
    "input size, parameters, licence, and where this machine has its weights (the local Hugging "
    "Face cache, HF_HUB_CACHE / HF_HOME, or a folder named like the hub repo under --search). "
    "With --slide: the slide encoders (TITAN, Prov-GigaPath slide, PRISM, FEATHER) and the tile "
    "encoder and grid each needs. Nothing is downloaded; missing weights show the command to "
    "fetch them on a connected machine."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default=None, help="glob on the name, e.g. 'kaiko-*'")
    p.add_argument("--slide", action="store_true", help="list the slide encoders instead")
    p.add_argument("--search", action="append", default=[], metavar="DIR",
                   help="also look for weight folders (e.g. DIR/UNI/) here; repeatable")


def run(args: argparse.Namespace) -> int:
    if args.slide:
        from wsi_ssl.encoders.slide import slide_encoder_table  # lazy: torch (--help light)

        print(slide_encoder_table(tuple(args.search)))
        return 0
    from wsi_ssl.encoders import encoder_table  # lazy: torch; keeps wsi-ssl --help light

    print(encoder_table(args.pattern, search=tuple(args.search)))
    return 0
