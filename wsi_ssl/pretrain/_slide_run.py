"""One-call entry points of slide SSL on paths (what ``wsi-ssl pretrain-slides`` and
``wsi-ssl encode-slides`` call)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wsi_ssl._utils import resolve_device
from wsi_ssl._validation import validate_params
from wsi_ssl.errors import StoreError
from wsi_ssl.pretrain._presets import (
    AUTO_PARAMS,
    DEFAULT_PRESET,
    PAPER_SETTINGS,
    PRESETS,
    SlideSSLPreset,
    slide_ssl_preset,
)
from wsi_ssl.pretrain._slide_data import load_cohort
from wsi_ssl.pretrain._slide_ssl import SlideSSL
from wsi_ssl.store import SlideEmbeddings, TileStore

__all__ = ["pretrain_slides", "encode_slides", "EncodeResult", "mean_pool_embeddings",
           "preset_for_store"]

logger = logging.getLogger(__name__)


def _open_store(path: str | os.PathLike) -> TileStore:
    if not Path(path).exists():
        raise StoreError(f"tile store '{path}' does not exist; create it with `wsi-ssl embed`.")
    return TileStore(path, mode="r")


def pretrain_slides(store: str | os.PathLike, out_dir: str | os.PathLike, *,
                    resume: bool = False,
                    preset: Literal["auto", "paper"] | None = DEFAULT_PRESET,
                    **params: Any) -> SlideSSL:
    """Train a :class:`~wsi_ssl.pretrain.SlideSSL` on the tile store at ``store`` (opened once,
    read-only), checkpointing into ``out_dir``, and save the model there
    (``model.safetensors``, ``config.json``, ``loss_curve.png``).

    Args:
        store: path of a tile store with an augmentation bank.
        out_dir: model directory (also the checkpoint directory).
        resume: continue an interrupted run from ``out_dir``'s checkpoint.
        preset: ``"auto"``: every setting of :data:`~wsi_ssl.pretrain._presets.AUTO_PARAMS` not
            in ``params`` is ``"auto"`` (chosen in ``fit`` from the store and the device);
            ``"paper"``: Giga-SSL's values; ``None``: SlideSSL's defaults (the paper's values
            too). The default, ``"auto"``, is ``wsi-ssl pretrain-slides``'s.
        **params: :class:`SlideSSL` arguments (``head=``, ``epochs=``, ``tiles_per_view=``...),
            passed on unchanged.

    Returns:
        the fitted :class:`SlideSSL` (``tiles_per_view_``... hold the values used).
    """
    validate_params("pretrain_slides", {"preset": preset}, {"preset": [PRESETS, None]})
    if preset is not None:
        base = ({k: "auto" for k in AUTO_PARAMS} if preset == "auto" else dict(PAPER_SETTINGS))
        params = {**base, **params}
    ts = _open_store(store)
    model = SlideSSL(**params, checkpoint_dir=out_dir)
    model.fit(ts, resume=resume)
    model.save(out_dir)
    return model


@dataclass(frozen=True)
class EncodeResult:
    """What :func:`encode_slides` wrote.

    Attributes:
        embeddings: the slide embeddings (also saved at ``path``).
        path: the ``.npz`` file written.
    """

    embeddings: SlideEmbeddings
    path: Path


def encode_slides(store: str | os.PathLike, model_dir: str | os.PathLike,
                  out: str | os.PathLike, *, dtype: Literal["float16", "float32"] = "float16",
                  device: str | None = None) -> EncodeResult:
    """Embed every slide of ``store`` with the model in ``model_dir`` and save ``out`` (.npz).

    Returns:
        an :class:`EncodeResult` (the embeddings and the path written).
    """
    model = SlideSSL.load(model_dir, device=device)
    emb = model.transform(_open_store(store), dtype=dtype)
    path = Path(emb.save(out))
    logger.info("wrote %d slide embeddings to %s (%.0f bytes per slide)", len(emb), path,
                emb.nbytes_per_slide)
    return EncodeResult(embeddings=emb, path=path)


def mean_pool_embeddings(store: Any, slide_ids: Sequence[str] | None = None) -> SlideEmbeddings:
    """The baseline slide embedding: the mean of each slide's clean tile features.

    Computed from the statistics the store keeps per slide (``features_sum / n_tiles``, summed in
    float64 when the slide was written): metadata only, no array read, and at least as exact as
    averaging the stored features in float32. A slide without tiles gives a NaN row.

    Args:
        store: a :class:`~wsi_ssl.store.TileStore`.
        slide_ids: slides to embed, in this order (default: all complete slides).

    Returns:
        :class:`~wsi_ssl.store.SlideEmbeddings` with float32 ``(n_slides, D)`` rows.
    """
    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    rows = []
    for sid in ids:
        st = store.slide_stats(sid)
        s = np.asarray(st.features_sum, np.float64)
        rows.append(s / st.n_tiles if st.n_tiles else np.full(s.shape, np.nan))
    mat = (np.stack(rows) if rows else np.zeros((0, 0))).astype(np.float32)
    return SlideEmbeddings(tuple(ids), mat, {"method": "mean-pooled tile features",
                                             "store": str(getattr(store, "path", ""))})


def preset_for_store(store: str | os.PathLike | Any, preset: Literal["auto", "paper"] = "auto", *,
                     device: str = "auto") -> SlideSSLPreset:
    """:func:`~wsi_ssl.pretrain.slide_ssl_preset` for the slides of a tile store (a path or an
    open ``TileStore``): the usable slides (with tiles, finite, with a bank), the bank's tiles
    per version, and the device ``"auto"`` resolves to. ``SlideSSL(tiles_per_view="auto", ...)``
    does this inside ``fit``; this function inspects a choice without training."""
    ts = store if hasattr(store, "slide_stats") else TileStore(store, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cohort = load_cohort(ts)
    return slide_ssl_preset(preset, n_slides=len(cohort), bank_tiles=cohort.bank_tiles,
                            device=resolve_device(device).type)
