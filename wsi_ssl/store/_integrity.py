"""Integrity of tile-store slides: what ``write_slide`` records and what ``verify`` checks.

Every slide records, in its ``checksums`` attribute, the SHA-256 of each logical array
(``features``, ``coords``, ``views``, ``view_index``) as stored (C order, the stored dtype), and in
``shards`` the size of each shard file. Checking the shard sizes is one ``stat`` per shard and is
done on every read; hashing the bytes is what :meth:`TileStore.verify` adds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_ssl.errors import StoreFormatError
from wsi_ssl.store._layout import shard_problems

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store._tilestore import TileStore

__all__ = ["VerifyReport", "RepairPlan", "array_checksum", "check_slide"]


def array_checksum(data: np.ndarray) -> str:
    """SHA-256 (hex) of an array's bytes in C order."""
    data = np.ascontiguousarray(data)
    return hashlib.sha256(memoryview(data.reshape(-1)).cast("B") if data.size
                          else b"").hexdigest()


def check_slide(store: TileStore, slide_id: str, attrs: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one complete slide: missing or truncated shard files, chunks that
    cannot be decoded, bytes that differ from the recorded checksum. Empty list = intact."""
    problems = shard_problems(store._slide_dir(slide_id), attrs.get("shards") or {})
    bad = {p.split(":")[0] for p in problems}
    for name, want in (attrs.get("checksums") or {}).items():
        stored = "index" if name in ("coords", "view_index") else name
        if stored in bad:
            continue
        try:
            data = store._read_logical(slide_id, name)
        except (StoreFormatError, KeyError) as err:
            cause = err.__cause__ or err
            problems.append(f"{name}: unreadable chunk ({type(cause).__name__}: {cause})")
            continue
        if array_checksum(data) != want.get("sha256"):
            problems.append(f"{name}: bytes differ from the recorded checksum (altered)")
    return problems


@dataclass(frozen=True, kw_only=True)
class RepairPlan:
    """What re-making damaged slides of a store takes, as recorded in the store: the slides and
    the embed settings they were made with (those of the first damaged slide). The store does
    not word it: ``embed_slides(..., repair=True)`` with these settings re-embeds them, and the
    CLI prints the matching ``wsi-ssl embed --repair`` command.

    Attributes:
        store: the store path.
        slide_ids: the damaged slides.
        imported: the slides were imported from h5 files (re-import them with
            ``TileStore.import_h5(paths, overwrite=True)``; nothing to re-embed).
        encoder: the encoder name recorded.
        weights: where the encoder's weights came from (``"random"``, ``"file"``,
            ``"builtin"``, ...; ``None`` when not recorded).
        mpp, tile_size, min_tissue, views, view_tiles, seed, dtype: the recorded embed settings
            (``None`` where the slide does not record one).
        augment: the augmentation preset name (``None``: a custom config or none recorded).
        assume_mpp: the slide's own µm/px when it was assumed (not read from the slide or a
            manifest), else ``None``.
    """

    store: Path
    slide_ids: tuple[str, ...]
    imported: bool = False
    encoder: str = "ENCODER"
    weights: str | None = None
    mpp: float | None = None
    tile_size: int | None = None
    min_tissue: float | None = None
    views: int | None = None
    view_tiles: int | None = None
    seed: int | None = None
    dtype: str | None = None
    augment: str | None = None
    assume_mpp: float | None = None

    @classmethod
    def from_attrs(cls, store: str | Path, slide_ids: Sequence[str],
                   attrs: Mapping[str, Any]) -> RepairPlan:
        """The plan of ``slide_ids`` of ``store``, from the attributes ``attrs`` recorded in
        (the first of) them."""
        s = dict(attrs.get("embed_settings") or {})
        assumed = attrs.get("mpp_assumed") and attrs.get("manifest_mpp") is None
        preset = s.get("augment_preset")
        return cls(
            store=Path(store), slide_ids=tuple(slide_ids), imported=bool(attrs.get("imported")),
            encoder=str(attrs.get("encoder", "ENCODER")), weights=attrs.get("encoder_weights"),
            mpp=s.get("mpp", attrs.get("mpp")),
            tile_size=s.get("tile_size", attrs.get("tile_size")), min_tissue=s.get("min_tissue"),
            views=s.get("views", attrs.get("views_requested")), view_tiles=s.get("view_tiles"),
            seed=s.get("seed", attrs.get("seed")),
            dtype=s.get("dtype", attrs.get("features_dtype")),
            augment=preset if isinstance(preset, str) else None,
            assume_mpp=attrs.get("slide_mpp") if assumed else None)

    def settings(self) -> dict[str, Any]:
        """The recorded settings as ``embed_slides`` keywords (those recorded only)."""
        names = ("mpp", "tile_size", "min_tissue", "views", "view_tiles", "augment", "seed",
                 "dtype", "assume_mpp")
        return {"encoder": self.encoder,
                **{k: getattr(self, k) for k in names if getattr(self, k) is not None}}


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What :meth:`TileStore.verify` found.

    Attributes:
        store: the store path.
        checked: ids of complete slides whose arrays were re-read and hashed.
        damaged: ``{slide_id: "views: shard file views/c.0.0.0 missing; ..."}``.
        unreadable: ``{slide_id: reason}`` of slide groups whose metadata cannot be read.
        unchecked: complete slides without recorded checksums.
        repair: what re-making exactly the damaged slides takes (``None`` when none is
            damaged); ``wsi-ssl info --verify`` words it as a command.
    """

    store: Path
    checked: tuple[str, ...]
    damaged: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    unchecked: tuple[str, ...] = ()
    repair: RepairPlan | None = None

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.unreadable
