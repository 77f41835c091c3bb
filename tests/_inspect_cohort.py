"""One small generated cohort, embedded once per test session, shared by the inspection tests
(heatmaps, clusters, QuPath export, AnnData): tumour regions are planted and recorded, so tile
scores can be checked against the truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

N_SLIDES = 16
SIZE = (2048, 2048)
TILE = 112


def inspect_cohort(tmp_path_factory: Any) -> tuple[Any, Any]:
    """``(CohortInfo, TileStore)``; the second call in a session reuses the files (make_cohort
    and embed_slides both skip finished work)."""
    from wsi_ssl.datasets import make_cohort
    from wsi_ssl.store import TileStore
    from wsi_ssl.tiling import embed_slides

    root = Path(tmp_path_factory.getbasetemp()) / "inspect-cohort"
    cohort = make_cohort(root / "cohort", n_slides=N_SLIDES, size=SIZE, seed=3,
                         tumor_fraction=(0.1, 0.2), n_workers=2)
    embed_slides(cohort.slides_dir, "tiny-cnn", root / "tiles.zarr", tile_size=TILE, views=4,
                 view_tiles=16, device="cpu", client="sync", seed=0)
    return cohort, TileStore(root / "tiles.zarr", mode="r")
