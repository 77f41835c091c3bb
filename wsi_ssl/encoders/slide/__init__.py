"""Slide encoders: published slide foundation models (TITAN, Prov-GigaPath's LongNet, PRISM's
Perceiver, FEATHER's ABMIL) in pure torch, loaded offline and strictly from local weights, run on
the tiles of a tile store after checking they are the tiles the model needs.

``create_slide_encoder(name, weights=...) -> SlideEncoder``; ``encode_store(store, name, ...)``
gives the same :class:`~wsi_ssl.store.SlideEmbeddings` as slide SSL. See
``docs/slide-encoders.md``.
"""

from wsi_ssl.encoders.slide._encode import SlideEncodeResult, check_store, encode_store
from wsi_ssl.encoders.slide._model import SlideEncoder, create_slide_encoder, grid_positions
from wsi_ssl.encoders.slide._presets import (
    SlideEncoderPreset,
    get_slide_preset,
    list_slide_encoders,
)
from wsi_ssl.encoders.slide._table import slide_encoder_table

__all__ = [
    "create_slide_encoder",
    "list_slide_encoders",
    "get_slide_preset",
    "SlideEncoder",
    "SlideEncoderPreset",
    "SlideEncodeResult",
    "check_store",
    "encode_store",
    "grid_positions",
    "slide_encoder_table",
]
