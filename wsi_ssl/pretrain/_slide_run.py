"""One-call entry points of slide SSL on paths (what ``wsi-ssl pretrain-slides`` and
``wsi-ssl encode-slides`` call)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import StoreError

if TYPE_CHECKING:  # pragma: no cover
    from wsi_ssl.pretrain._slide_ssl import SlideSSL
    from wsi_ssl.store import SlideEmbeddings

__all__ = ["pretrain_slides", "encode_slides", "EncodeResult", "mean_pool_embeddings"]

logger = logging.getLogger(__name__)


def _open_store(path: str | os.PathLike):
    from wsi_ssl.store import TileStore

    if not Path(path).exists():
        raise StoreError(f"tile store '{path}' does not exist; create it with `wsi-ssl embed`.")
    return TileStore(path, mode="r")


def pretrain_slides(store: str | os.PathLike, out_dir: str | os.PathLike, *,
                    resume: bool = False, preset: Literal["auto", "paper"] | None = None,
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
            ``"paper"``: Giga-SSL's values; ``None``: SlideSSL's defaults.
        **params: :class:`SlideSSL` arguments (``head=``, ``epochs=``, ``batch_size=``...).

    Returns:
        the fitted :class:`SlideSSL` (``tiles_per_view_``... hold the values used).
    """
    from wsi_ssl.errors import ConfigError
    from wsi_ssl.pretrain._presets import AUTO_PARAMS, PAPER_SETTINGS
    from wsi_ssl.pretrain._slide_ssl import SlideSSL

    if preset not in (None, "auto", "paper"):
        raise ConfigError(f"preset={preset!r} must be 'auto', 'paper' or None.")
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
    from wsi_ssl.pretrain._slide_ssl import SlideSSL

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
    from wsi_ssl.store import SlideEmbeddings

    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    rows = []
    for sid in ids:
        st = store.slide_stats(sid)
        s = np.asarray(st.features_sum, np.float64)
        rows.append(s / st.n_tiles if st.n_tiles else np.full(s.shape, np.nan))
    mat = (np.stack(rows) if rows else np.zeros((0, 0))).astype(np.float32)
    return SlideEmbeddings(tuple(ids), mat, {"method": "mean-pooled tile features",
                                             "store": str(getattr(store, "path", ""))})
