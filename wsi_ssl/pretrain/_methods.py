"""Tile-level self-supervised methods: SimCLR and BYOL (the momentum-teacher method).

Each method is an ``nn.Module`` that owns the backbone (``.backbone``, the part that is saved as
the tile encoder) and its heads; ``forward(x_a, x_b)`` takes two normalised augmented views and
returns the scalar loss; ``after_step(step, total_steps)`` does per-step bookkeeping (BYOL's
teacher update).

Why BYOL as the momentum-teacher method (rather than MoCo v3 or DINO):

* no negatives: tiles of one slide, or of one tissue type, are near-duplicates, so contrastive
  negatives in a histology batch are often false negatives; BYOL only pulls views together;
* robust to small batches (Grill et al. 2020, Fig. 3): users pretraining on one GPU, or our CPU
  tests, cannot afford the 4096-image batches MoCo v3 and SimCLR prefer;
* simple and stable: one MLP predictor, an EMA teacher and a cosine loss; none of DINO's
  centering/sharpening and multi-crop machinery, fewer hyper-parameters to get wrong.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from wsi_ssl._validation import Interval, validate_params
from wsi_ssl.pretrain._heads import ProjectionHead
from wsi_ssl.pretrain._losses import BYOLLoss, NTXentLoss

__all__ = ["SimCLR", "BYOL", "METHODS"]


class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020): backbone -> projection MLP -> NT-Xent between two views.

    Args:
        backbone: maps normalised ``(B, 3, S, S)`` to ``(B, D)`` features.
        embed_dim: ``D``.
        hidden_dim: width of the projection MLP's hidden layer.
        out_dim: projection size fed to the loss.
        temperature: NT-Xent temperature.

    Shape:
        ``x_a``, ``x_b``: ``(B, 3, S, S)`` -> scalar loss.
    """

    name = "simclr"

    def __init__(self, backbone: nn.Module, embed_dim: int, *, hidden_dim: int = 2048,
                 out_dim: int = 128, temperature: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = ProjectionHead((embed_dim, hidden_dim, out_dim))
        self.criterion = NTXentLoss(temperature)

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        z = self.projector(self.backbone(torch.cat([x_a, x_b])))
        z_a, z_b = z.chunk(2)
        return self.criterion(z_a, z_b)

    def after_step(self, step: int, total_steps: int) -> None:  # noqa: D102 - nothing to do
        return None


class BYOL(nn.Module):
    """BYOL (Grill et al. 2020, arXiv:2006.07733): an online network (backbone, projector,
    predictor) regresses the projection of an exponential-moving-average teacher.

    The teacher momentum follows BYOL's cosine schedule from ``momentum`` to 1 over training.

    Args:
        backbone: maps normalised ``(B, 3, S, S)`` to ``(B, D)`` features.
        embed_dim: ``D``.
        hidden_dim: hidden width of projector and predictor (BYOL: 4096).
        out_dim: projection size (BYOL: 256).
        momentum: teacher EMA momentum at step 0 (BYOL: 0.996; 0.99 suits short runs).

    Shape:
        ``x_a``, ``x_b``: ``(B, 3, S, S)`` -> scalar loss.
    """

    name = "byol"

    def __init__(self, backbone: nn.Module, embed_dim: int, *, hidden_dim: int = 2048,
                 out_dim: int = 256, momentum: float = 0.99) -> None:
        super().__init__()
        validate_params("BYOL", {"momentum": momentum}, {"momentum": [Interval(float, 0, 1)]},
                        hint="(e.g. 0.99)")
        self.backbone = backbone
        self.projector = ProjectionHead((embed_dim, hidden_dim, out_dim))
        self.predictor = ProjectionHead((out_dim, hidden_dim, out_dim))
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_projector = copy.deepcopy(self.projector)
        for p in self._teacher_params():
            p.requires_grad_(False)
        self.base_momentum = float(momentum)
        self.criterion = BYOLLoss()

    def _teacher_params(self):
        yield from self.teacher_backbone.parameters()
        yield from self.teacher_projector.parameters()

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x_a, x_b])
        p_a, p_b = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            z_a, z_b = self.teacher_projector(self.teacher_backbone(x)).chunk(2)
        return self.criterion(p_a, p_b, z_a, z_b)

    def momentum_at(self, step: int, total_steps: int) -> float:
        """``1 - (1 - m0) (cos(pi step / total) + 1) / 2`` (BYOL eq. in section 3.2)."""
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        return 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * frac) + 1) / 2

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """EMA update of the teacher (parameters and BatchNorm buffers)."""
        m = self.momentum_at(step, total_steps)
        for online, teacher in ((self.backbone, self.teacher_backbone),
                                (self.projector, self.teacher_projector)):
            for po, pt in zip(online.parameters(), teacher.parameters(), strict=True):
                pt.mul_(m).add_(po.detach(), alpha=1 - m)
            for bo, bt in zip(online.buffers(), teacher.buffers(), strict=True):
                bt.copy_(bo)


#: method name -> class (``pretrain_tile_encoder(method=...)``).
METHODS: dict[str, type[nn.Module]] = {"simclr": SimCLR, "byol": BYOL}
