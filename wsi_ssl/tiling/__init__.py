"""wsi_ssl.tiling: open any slide, find tissue, cut MPP-exact tiles.

Three lines in a notebook::

    from wsi_ssl.tiling import open_slide, tile_grid, read_tiles
    with open_slide("slide.svs") as slide:
        grid = tile_grid(slide, mpp=0.5, tile_size=224)   # target µm/px, px
        for tiles, idx in read_tiles(slide, grid):
            ...

Coordinates are level-0 pixels ``(x, y)``; sizes ``(w, h)``; resolutions µm/px (``mpp``: the
target resolution of the tiles; ``slide_mpp``: the slide's own). The defaults of every setting
are the fields of :class:`EmbedConfig`.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsi_ssl.tiling._batch import SavedGrid, TilingReport, TilingRow, load_grid, tile_slides
from wsi_ssl.tiling._config import PRESET_FIELDS, EmbedConfig, grid_settings
from wsi_ssl.tiling._grid import TileGrid, tile_grid
from wsi_ssl.tiling._plot import plot_grid
from wsi_ssl.tiling._read import REGION_SIZE, TileBatch, read_tiles, tiles_as_dask
from wsi_ssl.tiling._slide import Slide, open_slide
from wsi_ssl.tiling._tissue import TissueMask, detect_tissue, tissue_mask_from_rgb

__all__ = [
    "open_slide",
    "Slide",
    "detect_tissue",
    "tissue_mask_from_rgb",
    "TissueMask",
    "tile_grid",
    "TileGrid",
    "read_tiles",
    "REGION_SIZE",
    "TileBatch",
    "tiles_as_dask",
    "plot_grid",
    "tile_slides",
    "TilingReport",
    "TilingRow",
    "load_grid",
    "SavedGrid",
    "embed_slides",
    "EmbedReport",
    "EmbedConfig",
    "grid_settings",
    "PRESET_FIELDS",
    "SlideResult",
    "SlideFailure",
    "JobQueueSpec",
    "SlurmSpec",
    "check_cluster",
    "ClusterCheckReport",
    "job_name_for",
]

_LAZY = {name: "wsi_ssl.tiling._embed"
         for name in ("embed_slides", "EmbedReport", "SlideResult", "SlideFailure")}
_LAZY.update({name: "wsi_ssl.tiling._jobqueue"
              for name in ("JobQueueSpec", "SlurmSpec", "check_cluster", "ClusterCheckReport",
                           "job_name_for")})


def __getattr__(name: str) -> Any:
    """``embed_slides``, the batch-cluster specs and their types are imported on first use
    (they pull in torch/dask)."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wsi_ssl.tiling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
