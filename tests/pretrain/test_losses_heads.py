"""Losses against direct reference computations; projection head structure."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.pretrain import BYOLLoss, NTXentLoss, ProjectionHead

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def ntxent_reference(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    """SimCLR eq. (1), one anchor at a time, with python loops."""
    z = torch.cat([z_a, z_b]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n = z.shape[0]
    b = n // 2
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_ntxent_matches_reference(t):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    loss = NTXentLoss(temperature=t)(z_a, z_b)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(ntxent_reference(z_a, z_b, t), rel=1e-5)


def test_ntxent_prefers_aligned_pairs():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 32, generator=g)
    aligned = NTXentLoss(0.2)(z, z + 0.01 * torch.randn(8, 32, generator=g))
    shuffled = NTXentLoss(0.2)(z, z[torch.randperm(8, generator=g)])
    assert aligned < shuffled


def test_ntxent_known_values():
    """Planted cases with closed-form losses: identical embeddings for every sample give
    log(2B - 1) (the positive is one of 2B - 1 equal candidates); orthonormal rows with
    z_a == z_b give -log(e^(1/T) / (e^(1/T) + 2B - 2)) (positive similarity 1, negatives 0)."""
    b, t = 4, 0.5
    same = torch.ones(b, 8)
    assert float(NTXentLoss(t)(same, same)) == pytest.approx(math.log(2 * b - 1), rel=1e-6)
    eye = torch.eye(b, 8)
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * b - 2)))
    assert float(NTXentLoss(t)(eye, eye)) == pytest.approx(want, rel=1e-6)
    # and the loss falls towards 0 as the temperature sharpens perfectly separated pairs
    assert float(NTXentLoss(0.05)(eye, eye)) < 1e-6 < want


def test_ntxent_gradients_flow():
    z_a = torch.randn(4, 8, requires_grad=True)
    z_b = torch.randn(4, 8, requires_grad=True)
    NTXentLoss()(z_a, z_b).backward()
    assert z_a.grad is not None and torch.isfinite(z_a.grad).all() and z_a.grad.abs().sum() > 0


def test_ntxent_bad_input():
    with pytest.raises(ConfigError, match="temperature=0"):
        NTXentLoss(temperature=0)
    with pytest.raises(InputError, match=r"same shape; got \(4, 8\) and \(4, 9\)"):
        NTXentLoss()(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(InputError, match="at least 2 pairs"):
        NTXentLoss()(torch.randn(1, 8), torch.randn(1, 8))


def test_byol_loss_matches_reference():
    g = torch.Generator().manual_seed(2)
    p_a, p_b, z_a, z_b = (torch.randn(5, 12, generator=g) for _ in range(4))
    ref = 0.0
    for p, z in ((p_a, z_b), (p_b, z_a)):
        for i in range(5):
            pn, zn = p[i] / p[i].norm(), z[i] / z[i].norm()
            ref += float(((pn - zn) ** 2).sum()) / 5 / 2  # ||p/|p| - z/|z|||^2 = 2 - 2 cos
    loss = BYOLLoss()(p_a, p_b, z_a, z_b)
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert float(BYOLLoss()(z_b, z_a, z_a, z_b)) == pytest.approx(0.0, abs=1e-6)
    # the teacher side gets no gradient
    za = z_a.clone().requires_grad_(True)
    pa = p_a.clone().requires_grad_(True)
    BYOLLoss()(pa, p_b, za, z_b).backward()
    assert za.grad is None and pa.grad is not None


def test_projection_head_structure():
    head = ProjectionHead((512, 512, 512, 256))
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert head(torch.randn(4, 512)).shape == (4, 256)
    assert head.in_dim == 512 and head.out_dim == 256
    plain = ProjectionHead((32, 16), batch_norm=False)
    assert [type(m) for m in plain] == [nn.Linear]
    nobn = ProjectionHead((32, 64, 8), batch_norm=False)
    assert [type(m) for m in nobn] == [nn.Linear, nn.ReLU, nn.Linear]
    assert nobn[0].bias is not None and head[0].bias is None
    with pytest.raises(ConfigError, match=r"dims=\(512,\)"):
        ProjectionHead((512,))
