"""Tiny tile encoders that run fast on a laptop CPU (tests, the demo, benchmarks).

Weights are random but *deterministic* (built under a fixed seed), so every process that builds
``"tiny-cnn"`` gets the same fingerprint and the same features.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["TinyCNN", "build_tiny_cnn", "build_tiny_vit"]


class TinyCNN(nn.Module):
    """Four strided 3x3 conv-BN-ReLU blocks and global average pooling.

    Shape:
        x: ``(B, 3, H, W)`` (any ``H, W`` >= 16); returns ``(B, width * 4)``.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chans[-1]

    def forward(self, x):
        return self.pool(self.features(x)).flatten(1)


def build_tiny_cnn() -> nn.Module:
    return TinyCNN(16)


def build_tiny_vit() -> nn.Module:
    """A 2-block ViT (patch 16, width 64) from timm at 64 px."""
    from timm.models.vision_transformer import (
        VisionTransformer,  # lazy: timm only when an encoder is built
    )

    return VisionTransformer(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                             mlp_ratio=2.0, num_classes=0)
