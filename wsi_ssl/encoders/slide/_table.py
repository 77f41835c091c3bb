"""The slide-encoder table of ``wsi-ssl encoders --slide``."""

from __future__ import annotations

import os
from pathlib import Path

from wsi_ssl.encoders._hub import locate_weights
from wsi_ssl.encoders.slide._model import slide_param_count
from wsi_ssl.encoders.slide._presets import SLIDE_PRESETS

__all__ = ["slide_encoder_table"]


def slide_encoder_table(search: tuple[str | os.PathLike, ...] = ()) -> str:
    """One line per slide-encoder preset: name, tile encoder and grid it needs, dimension,
    parameters (meta-device build), licence, and where this machine has the weights."""
    head = ("name", "tile encoder", "µm/px", "tile", "dim", "params", "licence",
            "weights (this machine)")
    rows = []
    for p in SLIDE_PRESETS:
        n = slide_param_count(p)
        found = locate_weights(p, search)
        where = str(Path(found).parent) if found else f"not found: {p.download_command}"
        rows.append((p.name, p.tile_encoder, f"{p.mpp:g}", str(p.tile_size), str(p.embed_dim),
                     f"{n / 1e6:.2f} M" if n < 1e7 else f"{n / 1e6:.1f} M", p.license, where))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths[:-1]), "-" * len(head[-1]))]
    return "\n".join(out + [fmt.format(*r) for r in rows])
