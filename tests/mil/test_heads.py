"""The one contract of every MIL head: shapes, exact padding, order invariance, errors."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.mil import (
    MeanPool,
    MILOutput,
    SparseConv2d,
    SparseGrid,
    create_head,
    grid_stride,
    list_heads,
    register_head,
    to_grid_units,
)
from wsi_ssl.mil._base import _REGISTRY

pytestmark = pytest.mark.usefixtures("single_thread_torch")

D = 12


def _small(name: str, n_classes: int = 0):
    kw = {"embed_dim": 16}
    if name == "transmil":
        kw.update(heads=4, landmarks=8)  # bags below are longer: the Nystrom path is exercised
    torch.manual_seed(0)
    return create_head(name, D, n_classes=n_classes, **kw).eval()


def test_list_heads_has_the_spec_heads():
    assert {"mean", "max", "abmil", "gated_abmil", "dsmil", "transmil", "sparseconv",
            "resmlp_mean"} <= set(list_heads())
    assert type(create_head("resmlp-mean", D)).__name__ == "ResidualMLPMean"


def test_register_head_refuses_an_existing_name_unless_overwrite():
    class Other(MeanPool):
        pass

    with pytest.raises(ConfigError, match="'mean' is already registered.*overwrite=True"):
        register_head("mean")(Other)
    assert _REGISTRY["mean"] is MeanPool
    try:
        register_head("mean", overwrite=True)(Other)
        assert type(create_head("mean", D)) is Other
    finally:
        register_head("mean", overwrite=True)(MeanPool)
    register_head("mean")(MeanPool)  # the same class again is not a conflict


def test_grid_units_from_attrs_or_coordinate_steps():
    import numpy as np

    xy = np.array([[1000, 1000], [1448, 1000], [1224, 1672]])
    assert grid_stride(xy, {"stride_level0": 100}) == 100
    assert grid_stride(xy, {}) == 224 and grid_stride(xy[:1]) == 1.0
    g = to_grid_units(xy, {"stride_level0": 224})
    assert g.dtype == np.float32 and g.tolist() == (xy / 224).astype(np.float32).tolist()
    assert to_grid_units(np.zeros((0, 2))).shape == (0, 2)


@pytest.mark.parametrize("name", list_heads())
@pytest.mark.parametrize("n_classes", [0, 3])
def test_head_contract(name: str, n_classes: int):
    head = _small(name, n_classes)
    g = torch.Generator().manual_seed(1)
    lens = [30, 13, 1]
    b, n = len(lens), max(lens)
    x = torch.randn(b, n, D, generator=g)
    coords = torch.randint(0, 9, (b, n, 2), generator=g).float() + 0.2 * torch.rand(b, n, 2,
                                                                                      generator=g)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, k in enumerate(lens):
        mask[i, :k] = True
    x_pad = x.masked_fill(~mask[..., None], float("nan"))  # garbage in the padding
    with torch.no_grad():
        out = head(x_pad, mask=mask, coords=coords)
    assert isinstance(out, MILOutput)
    assert out.embedding.shape == (b, head.embed_dim)
    assert torch.isfinite(out.embedding).all()
    if n_classes:
        assert out.logits is not None and out.logits.shape == (b, n_classes)
    else:
        assert out.logits is None
    if out.attention is not None:
        assert out.attention.shape == (b, n)
        assert torch.all(out.attention[~mask] == 0)
    for i, k in enumerate(lens):
        perm = torch.randperm(k, generator=g)
        with torch.no_grad():
            alone = head(x[i:i + 1, :k], coords=coords[i:i + 1, :k])
            shuffled = head(x[i:i + 1, perm], coords=coords[i:i + 1, perm])
        # padded == unpadded
        torch.testing.assert_close(out.embedding[i], alone.embedding[0], atol=1e-5, rtol=1e-4)
        # order invariance (coords permuted with the tiles)
        torch.testing.assert_close(shuffled.embedding, alone.embedding, atol=1e-5, rtol=1e-4)
        if n_classes:
            torch.testing.assert_close(out.logits[i], alone.logits[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(shuffled.logits, alone.logits, atol=1e-5, rtol=1e-4)
        if out.attention is not None:
            torch.testing.assert_close(out.attention[i, :k], alone.attention[0], atol=1e-5,
                                       rtol=1e-4)
            torch.testing.assert_close(shuffled.attention[0], alone.attention[0, perm],
                                       atol=1e-5, rtol=1e-4)
            assert abs(float(alone.attention.sum()) - 1.0) < 1e-3


@pytest.mark.parametrize("name", list_heads())
def test_head_trains_on_slide_ssl_batches(name: str):
    """The Giga-SSL shape: many slides, k=5 tiles each; gradients reach every parameter."""
    torch.manual_seed(0)
    kw = {"heads": 4, "landmarks": 16} if name == "transmil" else {}
    head = create_head(name, D, n_classes=0, embed_dim=32, **kw).train()
    x = torch.randn(64, 5, D)
    coords = torch.randint(0, 6, (64, 5, 2)).float()
    out = head(x, coords=coords)
    assert out.embedding.shape == (64, 32) and out.logits is None
    out.embedding.pow(2).sum().backward()
    grads = {n: p.grad for n, p in head.named_parameters()}
    # without classes DSMIL's instance classifier only picks the critical tile (argmax): no grad
    untrained = {"instance_classifier.weight", "instance_classifier.bias"} if name == "dsmil" else set()
    assert all(grads[n] is not None for n in grads if n not in untrained), grads.keys()
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    if name not in ("mean", "max"):  # the first per-tile layer learns
        first = head.inp if name == "resmlp_mean" else head.proj[0]
        assert float(first.weight.grad.abs().sum()) > 0


def test_unknown_head_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown MIL head 'abmill'.*'abmil'"):
        create_head("abmill", 8)
    with pytest.raises(ConfigError, match="embed_dim"):
        create_head("abmil", 8, embed_dim=0)
    with pytest.raises(ConfigError, match="bad option"):
        create_head("mean", 8, no_such_option=1)


def test_head_input_errors():
    head = create_head("abmil", 8, embed_dim=8)
    with pytest.raises(InputError, match="feature dim 5 .*in_dim=8"):
        head(torch.randn(1, 4, 5))
    with pytest.raises(InputError, match=r"\(B, N, D\)"):
        head(torch.randn(4, 8))
    with pytest.raises(InputError, match=r"bag\(s\) \[1\] have no real tile"):
        head(torch.randn(2, 3, 8), mask=torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool))
    with pytest.raises(InputError, match="mask must have shape"):
        head(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    sc = create_head("sparseconv", 8, embed_dim=8)
    with pytest.raises(InputError, match="needs coords"):
        sc(torch.randn(1, 3, 8))
    with pytest.raises(InputError, match="NaN or inf"):
        sc(torch.randn(1, 3, 8), coords=torch.tensor([[[0.0, 0], [1, float("nan")], [2, 2]]]))


def test_sparse_conv_matches_dense_conv2d():
    """The sparse 3x3 conv over occupied cells == a dense conv on a zero-filled canvas."""
    torch.manual_seed(0)
    e_in, e_out, k = 4, 5, 3
    conv = SparseConv2d(e_in, e_out, k)
    cells = torch.tensor([[0, 0], [1, 0], [1, 1], [3, 2], [4, 4], [0, 4], [2, 3]])
    feats = torch.randn(len(cells), e_in)
    grid = SparseGrid(cells[None].float() + 10, torch.ones(1, len(cells), dtype=torch.bool))
    c = grid.tiles_to_cells(feats[None])  # cells sorted by key = (x, y)
    order = torch.argsort(cells[:, 0] * 100 + cells[:, 1])
    sparse = conv(c, grid)
    canvas = torch.zeros(1, e_in, 5, 5)
    canvas[0, :, cells[:, 0], cells[:, 1]] = feats.T
    w = conv.weight.detach().reshape(k, k, e_in, e_out).permute(3, 2, 0, 1)
    dense = F.conv2d(canvas, w, conv.bias.detach(), padding=1)[0]
    expected = dense[:, cells[order, 0], cells[order, 1]].T
    torch.testing.assert_close(sparse.detach(), expected, atol=1e-5, rtol=1e-5)


def test_sparseconv_does_not_scale_with_slide_area():
    """Tiles a million cells apart: a dense canvas would need ~10^12 cells."""
    head = create_head("sparseconv", D, embed_dim=8).eval()
    coords = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1e6, 1e6], [1e6 + 1, 1e6]]])
    with torch.no_grad():
        out = head(torch.randn(1, 4, D), coords=coords)
    grid = SparseGrid(coords, torch.ones(1, 4, dtype=torch.bool))
    assert grid.n_cells == 4
    assert int((grid.neighbours(1, 0) < 4).sum()) == 2  # two horizontal neighbour pairs
    assert torch.isfinite(out.embedding).all()


def test_tiles_in_one_cell_are_averaged():
    head = create_head("sparseconv", D, embed_dim=8, pooling="mean").eval()
    x = torch.randn(1, 3, D)
    coords = torch.tensor([[[2.0, 2.0], [2.2, 1.9], [5.0, 5.0]]])
    with torch.no_grad():
        out = head(x, coords=coords)
    torch.testing.assert_close(out.attention, torch.tensor([[0.25, 0.25, 0.5]]))


def test_sparseconv_attention_pooling_is_a_per_bag_softmax_over_cells():
    torch.manual_seed(0)
    head = create_head("sparseconv", D, embed_dim=8, n_layers=0).eval()
    assert head.pooling == "attention"  # the default
    x = torch.randn(2, 4, D)
    coords = torch.tensor([[[2.0, 2.0], [2.2, 1.9], [5.0, 5.0], [9.0, 1.0]],
                           [[0.0, 0.0], [3.0, 3.0], [0.0, 0.0], [7.0, 7.0]]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    with torch.no_grad():
        out = head(x, mask=mask, coords=coords)
        for b in range(2):  # reference: cells by hand, dense softmax, weighted sum
            cells: dict[tuple, list[int]] = {}
            for i in torch.nonzero(mask[b]).flatten().tolist():
                cells.setdefault(tuple(torch.round(coords[b, i]).tolist()), []).append(i)
            h = torch.stack([head.proj(x[b, idx]).mean(0) for idx in cells.values()])
            gate = torch.tanh(head.attn_v(h)) * torch.sigmoid(head.attn_u(h))
            w = torch.softmax(head.attn_w(gate).squeeze(-1), dim=0)
            torch.testing.assert_close(out.embedding[b], (w[:, None] * h).sum(0))
            for wc, idx in zip(w, cells.values(), strict=True):  # a cell's weight, shared
                torch.testing.assert_close(out.attention[b, idx], (wc / len(idx)).expand(len(idx)))
    assert out.attention[1, 2] == 0 and abs(float(out.attention[0].sum()) - 1) < 1e-5
    with pytest.raises(ConfigError, match="pooling"):
        create_head("sparseconv", D, pooling="sum")


def test_sparseconv_attention_finds_a_minority_cell_mean_pooling_dilutes():
    """One informative tile among 64, somewhere in each positive bag: trained on bag labels,
    attention pooling generalises to new bags; the same head with mean pooling barely does."""
    from sklearn.metrics import roc_auc_score

    def bags(seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 64, D, generator=g)
        y = torch.arange(64) % 2
        where = torch.randint(0, 64, (64,), generator=g)
        x[y == 1, where[y == 1], 0] += 6.0
        return x, y

    (x, y), (x_test, y_test) = bags(0), bags(1)
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1)
    coords = (3 * grid).reshape(1, 64, 2).expand(64, 64, 2)  # no neighbours: pooling decides
    auc = {}
    for pooling in ("attention", "mean"):
        torch.manual_seed(0)
        head = create_head("sparseconv", D, n_classes=2, embed_dim=16, pooling=pooling)
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        for _ in range(80):
            loss = F.cross_entropy(head(x, coords=coords).logits, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = head.eval()(x_test, coords=coords).logits.softmax(-1)[:, 1]
        auc[pooling] = roc_auc_score(y_test.numpy(), p.numpy())
    assert auc["attention"] > 0.9 and auc["attention"] > auc["mean"] + 0.15, auc


def test_transmil_nystrom_close_to_full_attention_on_short_bags():
    torch.manual_seed(0)
    ny = create_head("transmil", D, embed_dim=16, heads=4, landmarks=64,
                     pinv_iterations=12).eval()
    full = create_head("transmil", D, embed_dim=16, heads=4, attention="full").eval()
    full.load_state_dict(ny.state_dict())
    x = torch.randn(2, 20, D)
    with torch.no_grad():
        a, b = ny(x), full(x)
    torch.testing.assert_close(a.embedding, b.embedding, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(a.attention, b.attention, atol=2e-3, rtol=1e-2)


_PEAK_MEMORY_SCRIPT = """
import json, os, threading, torch
from wsi_ssl.mil import create_head
torch.set_num_threads(1)
torch.manual_seed(0)
head = create_head("transmil", 32, embed_dim=32, heads=2, landmarks=64).eval()
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * page

def bag(n):
    xy = torch.stack(torch.meshgrid(torch.arange(n // 100), torch.arange(100), indexing="ij"), -1)
    return torch.randn(1, n, 32), xy.reshape(1, n, 2).float()

def peak_growth_mib(x, c):
    # the resident size sampled every 0.5 ms while the forward runs, minus the size before it
    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.wait(0.0005):  # a sampling period; returns at once when the forward ends
            peak[0] = max(peak[0], rss())

    t = threading.Thread(target=sample)
    t.start()
    out = head(x, coords=c)
    done.set()
    t.join()
    return (max(peak[0], rss()) - before) / 2**20, out

res = {}
with torch.no_grad():
    x, c = bag(200)
    head(x, coords=c)  # warm-up: lazy initialisation
    for n in (10_000, 20_000):
        x, c = bag(n)
        grow, out = peak_growth_mib(x, c)
        res[n] = {"grow_mib": grow, "emb": list(out.embedding.shape),
                  "att_sum": float(out.attention.sum()),
                  "finite": bool(out.embedding.isfinite().all())}
        del x, c, out
print(json.dumps(res))
"""


def test_transmil_nystrom_memory_is_linear_on_a_20k_tile_bag():
    """Inference on 10k- and 20k-tile bags in a fresh process: the peak resident memory growth
    during the forward doubles with the bag (linear), and stays far below one full attention map
    (20k x 20k float32 = 1.6 GB per head). Allocations over 1 MiB are mmap-ed by glibc there
    (``MALLOC_MMAP_THRESHOLD_``), so freed memory is not silently reused and every large
    intermediate shows in the resident size."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY_SCRIPT], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    small, big = res["10000"], res["20000"]
    assert big["emb"] == [1, 32] and big["finite"] and abs(big["att_sum"] - 1.0) < 0.05
    full_map_mib = 20_000 ** 2 * 4 / 2**20  # one head's attention matrix
    assert big["grow_mib"] < full_map_mib / 2, res
    assert 1.5 < big["grow_mib"] / small["grow_mib"] < 2.6, res  # quadratic would be ~4
