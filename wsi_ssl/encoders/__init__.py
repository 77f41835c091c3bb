"""Tile encoders: pathology foundation models (UNI, Virchow, H-optimus, GigaPath, Kaiko, ...)
from local weights, any timm architecture, or a registered small model.

``create_encoder(name, *, weights=None, device="auto", dtype="auto") -> TileEncoder``; the encoder's
``embed(tiles)`` takes uint8 ``(B, H, W, 3)`` tiles (or float ``(B, 3, H, W)`` in [0, 1]) and returns
float32 ``(B, D)`` features on the CPU. No network, ever: preset weights come from a file, a
``huggingface-cli download --local-dir`` folder or the local Hugging Face cache.

Slide encoders (TITAN, Prov-GigaPath's slide encoder, PRISM, FEATHER) live in
:mod:`wsi_ssl.encoders.slide`: ``create_slide_encoder(name, weights=...)``.
"""

from wsi_ssl._utils import resolve_device
from wsi_ssl.encoders._encoder import TileEncoder, model_fingerprint
from wsi_ssl.encoders._identity import EncoderIdentity, encoder_identity, spec_fingerprint
from wsi_ssl.encoders._presets import EncoderPreset, get_preset, list_presets
from wsi_ssl.encoders._registry import (
    EncoderEntry,
    create_encoder,
    describe_encoder,
    encoder_from_spec,
    has_builtin_weights,
    register_encoder,
    warn_random_weights,
    weights_kind,
)
from wsi_ssl.encoders._table import EncoderInfo, encoder_infos, encoder_table, list_encoders
from wsi_ssl.encoders._weights import CHECKPOINT_FORMAT
from wsi_ssl.encoders.slide import (
    SlideEncoder,
    SlideEncoderPreset,
    create_slide_encoder,
    get_slide_preset,
    list_slide_encoders,
)

__all__ = [
    "create_encoder",
    "list_encoders",
    "register_encoder",
    "describe_encoder",
    "encoder_from_spec",
    "has_builtin_weights",
    "weights_kind",
    "warn_random_weights",
    "CHECKPOINT_FORMAT",
    "TileEncoder",
    "resolve_device",
    "EncoderEntry",
    "model_fingerprint",
    "EncoderIdentity",
    "encoder_identity",
    "spec_fingerprint",
    "EncoderPreset",
    "get_preset",
    "list_presets",
    "EncoderInfo",
    "encoder_infos",
    "encoder_table",
    "create_slide_encoder",
    "list_slide_encoders",
    "get_slide_preset",
    "SlideEncoder",
    "SlideEncoderPreset",
]
