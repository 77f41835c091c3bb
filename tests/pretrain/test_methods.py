"""SimCLR and BYOL modules: a few real optimisation steps, the BYOL teacher update."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ssl.augment import random_augment
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import ConfigError
from wsi_ssl.pretrain import BYOL, SimCLR

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _views(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(8, 3, 48, 48, generator=g) * 255).to(torch.uint8)
    rng = np.random.default_rng(seed)
    return (random_augment(base, rng, out_size=32), random_augment(base, rng, out_size=32))


@pytest.mark.parametrize("cls", [SimCLR, BYOL])
def test_method_steps_lower_the_loss(cls):
    torch.manual_seed(0)
    backbone = create_encoder("tiny-cnn", device="cpu").model
    m = cls(backbone, 64, hidden_dim=64)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    x_a, x_b = _views()
    losses = []
    for step in range(15):
        loss = m(x_a, x_b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step + 1, 15)
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] * 0.9, losses


def test_byol_teacher_is_an_ema():
    torch.manual_seed(0)
    m = BYOL(create_encoder("tiny-cnn", device="cpu").model, 64, hidden_dim=32, momentum=0.9)
    assert all(not p.requires_grad for p in m.teacher_backbone.parameters())
    w_online = next(m.backbone.parameters())
    w_teacher = next(m.teacher_backbone.parameters())
    assert torch.equal(w_online, w_teacher)
    before = w_teacher.detach().clone()
    with torch.no_grad():
        w_online.add_(1.0)
    mom = m.momentum_at(0, 100)
    assert mom == pytest.approx(0.9)
    m.after_step(0, 100)
    assert torch.allclose(w_teacher, mom * before + (1 - mom) * (before + 1.0), atol=1e-6)
    assert m.momentum_at(100, 100) == pytest.approx(1.0)
    assert m.momentum_at(50, 100) == pytest.approx(0.95)
    # only the online branch is trained
    x_a, x_b = _views(1)
    m(x_a[:4, :, :32, :32], x_b[:4]).backward()
    assert w_online.grad is not None and w_teacher.grad is None


def test_byol_bad_momentum():
    with pytest.raises(ConfigError, match="momentum=1.5"):
        BYOL(create_encoder("tiny-cnn", device="cpu").model, 64, momentum=1.5)
