"""One-call entry points of slide SSL on paths (what ``wsi-ssl pretrain-slides`` and
``wsi-ssl encode-slides`` call)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from wsi_ssl.errors import StoreError

__all__ = ["pretrain_slides", "encode_slides"]

logger = logging.getLogger(__name__)


def _open_store(path: str | os.PathLike):
    from wsi_ssl.store import TileStore

    if not Path(path).exists():
        raise StoreError(f"tile store '{path}' does not exist; create it with `wsi-ssl embed`.")
    return TileStore(path, mode="r")


def pretrain_slides(store: str | os.PathLike, out_dir: str | os.PathLike, *,
                    resume: bool = False, **params: Any):
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


def encode_slides(store: str | os.PathLike, model_dir: str | os.PathLike,
                  out: str | os.PathLike, *, dtype: Literal["float16", "float32"] = "float16",
                  device: str | None = None):
    """Embed every slide of ``store`` with the model in ``model_dir`` and save ``out`` (.npz).

    Returns:
        ``(SlideEmbeddings, path written)``.
    """
    from wsi_ssl.pretrain._slide_ssl import SlideSSL

    model = SlideSSL.load(model_dir, device=device)
    emb = model.transform(_open_store(store), dtype=dtype)
    path = emb.save(out)
    logger.info("wrote %d slide embeddings to %s (%.0f bytes per slide)", len(emb), path,
                emb.nbytes_per_slide)
    return emb, path
