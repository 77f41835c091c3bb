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
                    resume: bool = False, **params: Any) -> SlideSSL:
    """Train a :class:`~wsi_ssl.pretrain.SlideSSL` on the tile store at ``store``, checkpointing
    into ``out_dir``, and save the model there (``model.safetensors``, ``config.json``,
    ``loss_curve.png``).

    Args:
        store: path of a tile store with an augmentation bank.
        out_dir: model directory (also the checkpoint directory).
        resume: continue an interrupted run from ``out_dir``'s checkpoint.
        **params: :class:`SlideSSL` arguments (``head=``, ``epochs=``, ``batch_size=``...).

    Returns:
        the fitted :class:`SlideSSL`.
    """
    from wsi_ssl.pretrain._slide_ssl import SlideSSL

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

    Args:
        store: a :class:`~wsi_ssl.store.TileStore` (or anything with ``slide_ids`` and
            ``store[id].features``).
        slide_ids: slides to embed, in this order (default: all complete slides).

    Returns:
        :class:`~wsi_ssl.store.SlideEmbeddings` with float32 ``(n_slides, D)`` rows.
    """
    from wsi_ssl.store import SlideEmbeddings

    ids = list(slide_ids) if slide_ids is not None else list(store.slide_ids)
    mat = np.stack([np.asarray(store[s].features, np.float32).mean(0) for s in ids])
    return SlideEmbeddings(tuple(ids), mat, {"method": "mean-pooled tile features",
                                             "store": str(getattr(store, "path", ""))})
