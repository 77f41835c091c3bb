"""Backward-compatible alias of :mod:`wsi_ssl.augment` (the augmentations' one home).

``wsi_ssl.pretrain.augment`` was their home before they moved below ``tiling`` and
``pretrain``; new code imports ``wsi_ssl.augment``.
"""

from __future__ import annotations

from wsi_ssl import augment as _augment
from wsi_ssl.augment import *  # noqa: F403 - the alias re-exports exactly augment.__all__

__all__ = list(_augment.__all__)
