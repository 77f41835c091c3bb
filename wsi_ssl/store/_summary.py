"""What ``TileStore.summary()`` returns: the counts and sizes of a store."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["StoreSummary"]


@dataclass(frozen=True, kw_only=True)
class StoreSummary:
    """Counts and sizes of one :class:`~wsi_ssl.store.TileStore` (``wsi-ssl info`` prints them).

    Attributes:
        path: the store directory.
        format_version: the store format version in its root attributes (``None`` if unset).
        encoder: the tile encoder's name; ``None`` for an empty store.
        encoder_fingerprint: the encoder fingerprint recorded in the store.
        embed_dim: the feature width ``D``.
        slides: complete slides.
        tiles: tiles over the complete slides.
        views: augmented views over the complete slides.
        failures: slides recorded as failed.
        unreadable: slides kept but left out of training (damaged arrays).
        bytes: bytes on disk (temporary files and the lock marker not counted).
        bytes_per_slide: ``bytes / max(1, slides)``.
        bytes_per_tile: ``bytes / max(1, tiles)``.
    """

    path: str
    format_version: int | None
    encoder: str | None
    encoder_fingerprint: str | None
    embed_dim: int | None
    slides: int
    tiles: int
    views: int
    failures: int
    unreadable: int
    bytes: int
    bytes_per_slide: float
    bytes_per_tile: float

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)

    def __getitem__(self, key: str) -> Any:
        """Deprecated: ``summary()["slides"]`` (the former dict return); use ``.slides``."""
        warnings.warn("TileStore.summary() returns a StoreSummary; read its attributes "
                      f"(.{key}) instead of indexing it (summary()[{key!r}]).",
                      DeprecationWarning, stacklevel=2)
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)
