"""Self-supervised pretraining: losses and heads, tile-level SSL of a timm backbone (:func:`pretrain_tile_encoder`) and slide-level
Giga-SSL (:class:`SlideSSL`). The augmentations live in :mod:`wsi_ssl.augment` (below tiling and
pretrain).

Heavy parts (torch, timm) load on first use of a name, not at ``import wsi_ssl.pretrain``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "NTXentLoss",
    "BYOLLoss",
    "ProjectionHead",
    "SimCLR",
    "BYOL",
    "TileSSLDataset",
    "pretrain_tile_encoder",
    "TileSSLResult",
    "SlideSSL",
    "TileSSLConfig",
    "build_tile_ssl_method",
    "SlideTrainer",
    "TrainProgress",
    "SlideCohort",
    "load_cohort",
    "CoordAugment",
    "plot_loss",
    "pretrain_slides",
    "encode_slides",
    "EncodeResult",
    "mean_pool_embeddings",
    "SlideSSLPreset",
    "slide_ssl_preset",
    "preset_for_store",
    "AUTO_PARAMS",
    "PAPER_SETTINGS",
    "SLIDE_SSL_DEFAULTS",
    "DEFAULT_PRESET",
    "SLIDE_SSL_PRESETS",
]

_LAZY: dict[str, str] = {
    "NTXentLoss": "wsi_ssl.pretrain._losses",
    "BYOLLoss": "wsi_ssl.pretrain._losses",
    "ProjectionHead": "wsi_ssl.pretrain._heads",
    "SimCLR": "wsi_ssl.pretrain._methods",
    "BYOL": "wsi_ssl.pretrain._methods",
    "TileSSLDataset": "wsi_ssl.pretrain._tile_data",
    "pretrain_tile_encoder": "wsi_ssl.pretrain._tile_ssl",
    "TileSSLResult": "wsi_ssl.pretrain._tile_ssl",
    "SlideSSL": "wsi_ssl.pretrain._slide_ssl",
    "TileSSLConfig": "wsi_ssl.pretrain._tile_ssl",
    "build_tile_ssl_method": "wsi_ssl.pretrain._tile_ssl",
    "SlideTrainer": "wsi_ssl.pretrain._slide_train",
    "TrainProgress": "wsi_ssl.pretrain._slide_train",
    "SlideCohort": "wsi_ssl.pretrain._slide_data",
    "load_cohort": "wsi_ssl.pretrain._slide_data",
    "CoordAugment": "wsi_ssl.pretrain._slide_data",
    "plot_loss": "wsi_ssl.pretrain._slide_train",
    "pretrain_slides": "wsi_ssl.pretrain._slide_run",
    "encode_slides": "wsi_ssl.pretrain._slide_run",
    "EncodeResult": "wsi_ssl.pretrain._slide_run",
    "mean_pool_embeddings": "wsi_ssl.pretrain._slide_run",
    "SlideSSLPreset": "wsi_ssl.pretrain._presets",
    "slide_ssl_preset": "wsi_ssl.pretrain._presets",
    "preset_for_store": "wsi_ssl.pretrain._slide_run",
    "SLIDE_SSL_DEFAULTS": "wsi_ssl.pretrain._presets",
    "DEFAULT_PRESET": "wsi_ssl.pretrain._presets",
    "SLIDE_SSL_PRESETS": "wsi_ssl.pretrain._presets",
    "AUTO_PARAMS": "wsi_ssl.pretrain._presets",
    "PAPER_SETTINGS": "wsi_ssl.pretrain._presets",
}


def __getattr__(name: str) -> Any:
    modname = _LAZY.get(name)
    if modname is None:
        raise AttributeError(f"module 'wsi_ssl.pretrain' has no attribute {name!r}")
    mod = importlib.import_module(modname)
    value = getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
