"""Slide embeddings of a tile store with a slide-encoder preset, after checking that the store's
tiles are the ones the model was trained on (tile encoder, embedding dimension, µm/px, tile size,
a recorded grid stride). A mismatch is refused in one line naming both sides and the
``wsi-ssl embed`` command that makes the right tiles; ``force=True`` encodes anyway (except for a
dimension mismatch, which cannot run) and records the warnings in the output's provenance.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl._utils import progress
from wsi_ssl._version import __version__
from wsi_ssl.encoders._presets import get_preset
from wsi_ssl.encoders.slide._model import SlideEncoder, create_slide_encoder
from wsi_ssl.encoders.slide._presets import SlideEncoderPreset
from wsi_ssl.errors import EncoderMismatchError, InputError, StoreError
from wsi_ssl.store import SlideEmbeddings, TileStore

__all__ = ["check_store", "encode_store", "SlideEncodeResult"]

logger = logging.getLogger(__name__)

#: relative µm/px difference still accepted as "the same resolution"
MPP_TOLERANCE = 0.05


@dataclass(frozen=True)
class SlideEncodeResult:
    """What :func:`encode_store` produced.

    Attributes:
        embeddings: the slide embeddings (provenance names the slide encoder and any warning).
        path: the ``.npz`` written, or ``None``.
        warnings: compatibility problems overridden with ``force=True``.
    """

    embeddings: Any
    path: Path | None = None
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _tile_name(name: str | None) -> str | None:
    if name is None:
        return None
    p = get_preset(name)
    return p.name if p is not None else str(name)


def _describe(name: Any, dim: Any, mpp: Any, tile: Any) -> str:
    mpp_s = f"{float(mpp):g}" if isinstance(mpp, (int, float)) else "?"
    return f"{name!r} tiles ({dim}-d, {mpp_s} µm/px, {tile} px)"


def check_store(store: Any, preset: SlideEncoderPreset, *, force: bool = False,
                slide_ids: Sequence[str] | None = None, tile_dim: int | None = None
                ) -> list[str]:
    """Check that ``store`` holds the tiles ``preset`` needs; return the overridden problems
    (``force=True``), raise otherwise. ``tile_dim``: the feature dimension of the built model
    when its architecture was overridden (default: the preset's).

    Raises:
        EncoderMismatchError: other tile encoder, µm/px, tile size or grid overlap (without
            ``force``), or another embedding dimension (always).
        InputError: the slide encoder needs positions and a slide has no recorded stride.
    """
    enc = store.encoder or {}
    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    attrs = {sid: (store.slide_attrs(sid) or {}) for sid in ids}
    first = attrs[ids[0]] if ids else {}
    have_name = _tile_name(enc.get("name"))
    have = _describe(have_name, enc.get("embed_dim"), first.get("mpp"), first.get("tile_size"))
    tile_dim = int(tile_dim or preset.tile_dim)
    need = _describe(preset.tile_encoder, tile_dim, preset.mpp, preset.tile_size)
    where = f"tile store '{getattr(store, 'path', store)}'"
    fix = f"make them with `{preset.embed_command}`"
    if enc.get("embed_dim") is not None and int(enc["embed_dim"]) != tile_dim:
        raise EncoderMismatchError(
            f"{where} holds {have}; slide encoder {preset.name!r} needs {need}: {fix} "
            "(--force cannot help: the feature dimensions differ).")
    problems = []
    if have_name != preset.tile_encoder:
        problems.append(f"tile encoder {have_name!r} instead of {preset.tile_encoder!r}")
    off_mpp = [s for s, a in attrs.items() if a.get("mpp") is None
               or abs(float(a["mpp"]) / preset.mpp - 1) > MPP_TOLERANCE]
    if off_mpp:
        got = attrs[off_mpp[0]].get("mpp")
        problems.append(f"slide {off_mpp[0]!r}" + (f" and {len(off_mpp) - 1} more"
                                                    if len(off_mpp) > 1 else "")
                        + f" tiled at {got!r} µm/px instead of {preset.mpp:g}")
    off_tile = [s for s, a in attrs.items() if a.get("tile_size") is not None
                and int(a["tile_size"]) != preset.tile_size]
    if off_tile:
        got = attrs[off_tile[0]].get("tile_size")
        problems.append(f"slide {off_tile[0]!r}" + (f" and {len(off_tile) - 1} more"
                                                     if len(off_tile) > 1 else "")
                        + f" has {got} px tiles instead of {preset.tile_size}")
    if preset.positions != "none":
        overlapping = [s for s, a in attrs.items() if int(a.get("overlap") or 0) > 0]
        if overlapping:
            problems.append(f"slide {overlapping[0]!r} was tiled with overlap "
                            f"{attrs[overlapping[0]].get('overlap')} px (the model's grid has "
                            "none)")
        no_stride = [s for s, a in attrs.items() if not a.get("stride_level0")]
        if no_stride:
            raise InputError(f"{where}: slide {no_stride[0]!r} has no stride_level0 attribute; "
                             f"slide encoder {preset.name!r} places tiles on its grid with it "
                             f"(never a guessed patch size): re-embed with `{preset.embed_command}`.")
    if problems and not force:
        raise EncoderMismatchError(
            f"{where} holds {have}; slide encoder {preset.name!r} needs {need} ("
            + "; ".join(problems) + f"): {fix} (or pass --force / force=True to encode anyway, "
            "recorded in the output).")
    warnings = [f"forced: {p}; slide encoder {preset.name!r} needs {need}" for p in problems]
    for w in warnings:
        logger.warning("%s", w)
    return warnings


def _read(store: Any, sid: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(store, "read_features") and hasattr(store, "read_coords"):
        return np.asarray(store.read_features(sid)), np.asarray(store.read_coords(sid))
    rec = store[sid]
    return np.asarray(rec.features), np.asarray(rec.coords)


def encode_store(store: Any, slide_encoder: SlideEncoder | str, *,
                 weights: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
                 force: bool = False, slide_ids: Sequence[str] | None = None,
                 batch_size: int = 8, dtype: Literal["float16", "float32"] = "float32",
                 device: str = "auto", random_weights: bool = False) -> SlideEncodeResult:
    """Embed every slide of ``store`` with a slide-encoder preset; write ``out`` (.npz) if given.

    Args:
        store: a :class:`~wsi_ssl.store.TileStore` or its path.
        slide_encoder: a :class:`SlideEncoder` or a preset name (then built with ``weights``,
            ``device`` and ``random_weights``).
        force: encode even if the tiles are not the ones the model needs (the problems go into
            ``provenance["warnings"]``).
        slide_ids: slides to embed, in this order (default: all complete slides).
        batch_size: slides per forward pass for architectures where padding is exact (ABMIL,
            Perceiver); transformers over the tile grid take one slide at a time.
        dtype: storage dtype of the embeddings.

    Returns:
        a :class:`SlideEncodeResult`; the embeddings are a
        :class:`~wsi_ssl.store.SlideEmbeddings` (slides without tiles are skipped and listed in
        ``provenance["skipped"]``).
    """
    if isinstance(store, (str, os.PathLike)):
        if not Path(store).exists():
            raise StoreError(f"tile store '{store}' does not exist; create it with `wsi-ssl "
                             "embed`.")
        store = TileStore(store, mode="r")
    enc = slide_encoder if isinstance(slide_encoder, SlideEncoder) else create_slide_encoder(
        slide_encoder, weights=weights, device=device, random_weights=random_weights)
    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    warnings = check_store(store, enc.preset, force=force, slide_ids=ids, tile_dim=enc.tile_dim)
    kept, skipped, rows = [], [], []
    pending: list[tuple[np.ndarray, np.ndarray, float | None]] = []
    bar = progress(total=len(ids), desc=f"encode {enc.name}", unit="slide")

    def flush() -> None:
        if pending:
            rows.append(enc.encode_many(pending, batch_size=batch_size))
            pending.clear()

    for sid in ids:
        feats, coords = _read(store, sid)
        if not len(feats):
            skipped.append(sid)
        else:
            stride = (store.slide_attrs(sid) or {}).get("stride_level0")
            pending.append((feats, coords, None if stride is None else float(stride)))
            kept.append(sid)
            if len(pending) >= (batch_size if enc.preset.batched else 1):
                flush()
        bar.update(1)
    flush()
    bar.close()
    mat = (np.concatenate(rows) if rows else np.zeros((0, enc.embed_dim), np.float32))
    prov = {"method": f"slide encoder {enc.name}" + (" (RANDOM weights, no pretraining)"
                                                     if enc.weights is None else ""),
            "slide_encoder": enc.describe(), "store": str(getattr(store, "path", "")),
            "store_fingerprint": getattr(store, "fingerprint", None),
            "tile_encoder": store.encoder, "forced": bool(warnings), "warnings": warnings,
            "skipped": skipped, "wsi_ssl_version": __version__}
    emb = SlideEmbeddings(tuple(kept), mat.astype(dtype), prov)
    path = Path(emb.save(out)) if out is not None else None
    if path is not None:
        logger.info("wrote %d %s slide embeddings to %s", len(emb), enc.name, path)
    return SlideEncodeResult(embeddings=emb, path=path, warnings=tuple(warnings))
