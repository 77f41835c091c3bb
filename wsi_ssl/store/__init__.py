"""The zarr v3 tile store and slide-embedding files (see ``docs/store-format.md``)."""

from __future__ import annotations

import importlib
from typing import Any

from wsi_ssl.store._anndata import embeddings_to_anndata, tiles_to_anndata
from wsi_ssl.store._embeddings import SlideEmbeddings, load_embeddings
from wsi_ssl.store._integrity import RepairPlan
from wsi_ssl.store._lock import LockHolder
from wsi_ssl.store._stats import SlideStats
from wsi_ssl.store._summary import StoreSummary

__all__ = ["TileStore", "SlideRecord", "SlideEmbeddings", "load_embeddings",
           "STORE_FORMAT", "STORE_FORMAT_VERSION", "VerifyReport", "StoreLockedError",
           "tiles_to_anndata", "embeddings_to_anndata", "StoreSummary", "LockHolder",
           "SlideStats", "upgrade_store", "UpgradeReport", "RepairPlan"]

_LAZY = {"TileStore", "SlideRecord", "STORE_FORMAT", "STORE_FORMAT_VERSION", "VerifyReport",
         "StoreLockedError"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("wsi_ssl.store._tilestore"), name)
    if name in ("upgrade_store", "UpgradeReport"):
        return getattr(importlib.import_module("wsi_ssl.store._upgrade"), name)
    raise AttributeError(f"module 'wsi_ssl.store' has no attribute {name!r}")
