"""Tile encoders: any timm architecture (local weights only) or a registered small model.

``create_encoder(name, *, weights=None, device="auto", dtype="auto") -> TileEncoder``; the encoder's
``embed(tiles)`` takes uint8 ``(B, H, W, 3)`` tiles (or float ``(B, 3, H, W)`` in [0, 1]) and returns
float32 ``(B, D)`` features on the CPU. No network, ever.
"""

from wsi_ssl.encoders._encoder import TileEncoder, model_fingerprint
from wsi_ssl.encoders._registry import (
    EncoderEntry,
    create_encoder,
    describe_encoder,
    list_encoders,
    register_encoder,
)

__all__ = [
    "create_encoder",
    "list_encoders",
    "register_encoder",
    "describe_encoder",
    "TileEncoder",
    "EncoderEntry",
    "model_fingerprint",
]
