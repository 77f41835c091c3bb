"""wsi-ssl: whole-slide images to compact slide embeddings.

The pipeline, one subpackage per stage::

    wsi_ssl.tiling     open slides, find tissue, cut MPP-exact tiles, dask-parallel embedding
    wsi_ssl.encoders   tile encoders (any timm model, local weights only)
    wsi_ssl.store      the zarr v3 tile store and slide-embedding files
    wsi_ssl.mil        permutation-invariant MIL heads and a supervised MIL classifier
    wsi_ssl.pretrain   tile-level SSL and slide-level contrastive pretraining (Giga-SSL)
    wsi_ssl.eval       few-shot linear probes and survival models
    wsi_ssl.datasets   generated slide cohorts for demos and tests
    wsi_ssl.demo       the whole pipeline on a generated cohort (``wsi-ssl demo``)
    wsi_ssl.cli        the ``wsi-ssl`` command

Importing ``wsi_ssl`` is cheap: subpackages (and torch, dask, zarr) load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsi_ssl._version import __version__
from wsi_ssl.errors import WsiSslError

__all__ = [
    "__version__",
    "WsiSslError",
    "TileStore",
    "tiling",
    "encoders",
    "store",
    "mil",
    "pretrain",
    "eval",
    "datasets",
    "demo",
]

_SUBPACKAGES = {"tiling", "encoders", "store", "mil", "pretrain", "eval", "datasets", "cli",
                "demo"}


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"wsi_ssl.{name}")
    if name == "TileStore":
        from wsi_ssl.store import TileStore  # lazy: `import wsi_ssl` imports no subpackage

        return TileStore
    raise AttributeError(f"module 'wsi_ssl' has no attribute {name!r}")
