"""Integrity of tile-store slides: what ``write_slide`` records and what ``verify`` checks.

Every slide records, in its ``checksums`` attribute, the SHA-256 of each logical array
(``features``, ``coords``, ``views``, ``view_index``) as stored (C order, the stored dtype), and in
``shards`` the size of each shard file. Checking the shard sizes is one ``stat`` per shard and is
done on every read; hashing the bytes is what :meth:`TileStore.verify` adds.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.store._tilestore import TileStore

__all__ = ["VerifyReport", "array_checksum", "check_slide", "repair_command"]


def array_checksum(data: np.ndarray) -> str:
    """SHA-256 (hex) of an array's bytes in C order."""
    data = np.ascontiguousarray(data)
    return hashlib.sha256(memoryview(data.reshape(-1)).cast("B") if data.size
                          else b"").hexdigest()


def check_slide(store: TileStore, slide_id: str, attrs: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one complete slide: missing or truncated shard files, chunks that
    cannot be decoded, bytes that differ from the recorded checksum. Empty list = intact."""
    from wsi_ssl.errors import StoreFormatError
    from wsi_ssl.store._layout import shard_problems

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
class VerifyReport:
    """What :meth:`TileStore.verify` found.

    Attributes:
        store: the store path.
        checked: ids of complete slides whose arrays were re-read and hashed.
        damaged: ``{slide_id: "views: shard file views/c.0.0.0 missing; ..."}``.
        unreadable: ``{slide_id: reason}`` of slide groups whose metadata cannot be read.
        unchecked: complete slides without recorded checksums.
        repair: the command that re-embeds exactly the damaged slides ("" when none).
    """

    store: Path
    checked: tuple[str, ...]
    damaged: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    unchecked: tuple[str, ...] = ()
    repair: str = ""

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.unreadable


def repair_command(store: Path, attrs: Mapping[str, Any]) -> str:
    """``wsi-ssl embed --store STORE --repair ...`` with the settings recorded in a slide."""
    s = dict(attrs.get("embed_settings") or {})
    if attrs.get("imported"):
        return (f"re-import the damaged slides with TileStore({str(store)!r}).import_h5(paths, "
                "overwrite=True)")
    args = ["wsi-ssl", "embed", "--store", str(store), "--repair",
            "--encoder", str(attrs.get("encoder", "ENCODER"))]
    mpp = s.get("mpp", attrs.get("mpp"))
    for flag, val, default in (
            ("--mpp", mpp, None), ("--tile-size", s.get("tile_size", attrs.get("tile_size")), None),
            ("--min-tissue", s.get("min_tissue"), 0.25),
            ("--views", s.get("views", attrs.get("views_requested")), 0),
            ("--view-tiles", s.get("view_tiles"), 256), ("--seed", s.get("seed", attrs.get("seed")), 0),
            ("--dtype", s.get("dtype", attrs.get("features_dtype")), "float16")):
        if val is not None and val != default:
            args += [flag, str(val)]
    preset = s.get("augment_preset")
    if isinstance(preset, str) and preset != "histo":
        args += ["--augment", preset]
    if attrs.get("mpp_assumed") and attrs.get("manifest_mpp") is None:
        args += ["--assume-mpp", str(attrs.get("slide_mpp"))]
    return shlex.join(args) + "   (add --weights FILE if the encoder was built from weights)"
