"""Integrity of tile-store slides: what ``write_slide`` records and what ``verify`` checks.

Every slide written by this version records, in its ``checksums`` attribute, for each array the
SHA-256 of its bytes as stored (C order, the stored dtype) and the number of chunk files written
(``write_empty_chunks`` is on, so every chunk has a file). Counting the chunk files of an array is
cheap and is done on every read; hashing the bytes is what :meth:`TileStore.verify` adds.
"""

from __future__ import annotations

import hashlib
import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["VerifyReport", "array_checksum", "expected_chunks", "count_chunk_files",
           "missing_chunks", "check_slide", "repair_command"]


def array_checksum(data: np.ndarray) -> str:
    """SHA-256 (hex) of an array's bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def expected_chunks(shape: tuple[int, ...], chunks: tuple[int, ...]) -> int:
    """Chunks of a regular grid; 0 for an empty array."""
    if not shape or 0 in shape:
        return 0 if shape else 1
    return int(math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)))


def count_chunk_files(array_dir: Path) -> int:
    """Chunk files of a zarr v3 array with the default chunk key encoding (``c/i/j/...``)."""
    n = 0
    for _, _, files in os.walk(array_dir / "c"):
        n += len(files)
    return n


def missing_chunks(slide_dir: Path, attrs: Mapping[str, Any]) -> list[str]:
    """``"features: 1 of 3 chunk files missing"``-style problems of a slide, from the recorded
    chunk counts (empty when nothing was recorded: slides of older versions)."""
    out = []
    for name, rec in (attrs.get("checksums") or {}).items():
        want = int(rec.get("chunks", 0))
        have = count_chunk_files(slide_dir / name)
        if have < want:
            out.append(f"{name}: {want - have} of {want} chunk files missing")
    return out


def check_slide(slide_dir: Path, attrs: Mapping[str, Any]) -> list[str]:
    """Everything wrong with one complete slide: missing chunk files, chunks that cannot be
    decoded, bytes that differ from the recorded checksum. Empty list = intact."""
    import zarr

    problems = missing_chunks(slide_dir, attrs)
    bad = {p.split(":")[0] for p in problems}
    for name, rec in (attrs.get("checksums") or {}).items():
        if name in bad:
            continue
        try:
            data = zarr.open_array(str(slide_dir / name), mode="r", zarr_format=3)[...]
        except Exception as err:  # noqa: BLE001 - any codec/IO error means "unreadable"
            problems.append(f"{name}: unreadable chunk ({type(err).__name__}: {err})")
            continue
        if array_checksum(np.asarray(data)) != rec.get("sha256"):
            problems.append(f"{name}: bytes differ from the recorded checksum (altered)")
    return problems


@dataclass(frozen=True, kw_only=True)
class VerifyReport:
    """What :meth:`TileStore.verify` found.

    Attributes:
        store: the store path.
        checked: ids of complete slides whose arrays were re-read and hashed.
        damaged: ``{slide_id: "features: 1 of 3 chunk files missing; ..."}``.
        unreadable: ``{slide_id: reason}`` of slide groups whose metadata cannot be read.
        unchecked: complete slides without recorded checksums (written by an older wsi-ssl).
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
