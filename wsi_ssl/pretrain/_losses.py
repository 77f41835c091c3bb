"""Self-supervised losses: NT-Xent (SimCLR) and the BYOL regression loss.

Small ``nn.Module`` objects: tensors in, a scalar out, no configuration objects inside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from wsi_ssl._validation import Interval, validate_params
from wsi_ssl.errors import InputError

__all__ = ["NTXentLoss", "BYOLLoss"]


def _check_pair(z_a: torch.Tensor, z_b: torch.Tensor, name: str) -> None:
    if not (isinstance(z_a, torch.Tensor) and isinstance(z_b, torch.Tensor)):
        raise InputError(f"{name} expects two torch tensors; got {type(z_a).__name__}, "
                         f"{type(z_b).__name__}.")
    if z_a.ndim != 2 or z_a.shape != z_b.shape:
        raise InputError(
            f"{name} expects two (B, D) tensors of the same shape; got {tuple(z_a.shape)} and "
            f"{tuple(z_b.shape)}."
        )


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (SimCLR; Chen et al. 2020, arXiv:2002.05709).

    Row ``i`` of ``z_a`` and row ``i`` of ``z_b`` are the two views of one image (the positive
    pair); the other ``2B - 2`` embeddings of the batch are its negatives. The loss is the mean
    over all ``2B`` anchors of ``-log softmax(cos(anchor, .) / temperature)[positive]``.

    Args:
        temperature: softmax temperature (> 0); SimCLR uses 0.1-0.5.

    Shape:
        ``z_a``, ``z_b``: ``(B, D)`` with ``B >= 2`` -> scalar.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        validate_params("NTXentLoss", {"temperature": temperature},
                        {"temperature": [Interval(float, 0, None, closed="neither")]},
                        hint="(e.g. 0.5)")
        self.temperature = float(temperature)

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        _check_pair(z_a, z_b, "NTXentLoss")
        b = z_a.shape[0]
        if b < 2:
            raise InputError(f"NTXentLoss needs a batch of at least 2 pairs for negatives; got {b}.")
        z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
        sim = z @ z.T / self.temperature
        sim.fill_diagonal_(float("-inf"))
        idx = torch.arange(b, device=z.device)
        target = torch.cat([idx + b, idx])
        return F.cross_entropy(sim, target)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class BYOLLoss(nn.Module):
    """BYOL's normalised regression loss (Grill et al. 2020, arXiv:2006.07733), symmetrised.

    ``loss = mean_i (2 - 2 cos(p_a_i, z_b_i)) / 2 + mean_i (2 - 2 cos(p_b_i, z_a_i)) / 2``, where
    ``p`` are online predictions and ``z`` the (detached) momentum-teacher projections.

    Shape:
        ``p_a``, ``p_b``, ``z_a``, ``z_b``: ``(B, D)`` -> scalar in [0, 4].
    """

    def forward(self, p_a: torch.Tensor, p_b: torch.Tensor, z_a: torch.Tensor,
                z_b: torch.Tensor) -> torch.Tensor:
        _check_pair(p_a, z_b, "BYOLLoss")
        _check_pair(p_b, z_a, "BYOLLoss")

        def reg(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            cos = F.cosine_similarity(p.float(), z.detach().float(), dim=1)
            return (2 - 2 * cos).mean()

        return 0.5 * (reg(p_a, z_b) + reg(p_b, z_a))
