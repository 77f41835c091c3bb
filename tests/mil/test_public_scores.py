"""The public per-tile methods the heatmap calls (``MILClassifier.attention`` /
``tile_scores``, ``SlideSSL.attention``) give exactly what ``eval/_heatmap.py`` used to compute
from the fitted internals (``head_``, ``mean_``, ``scale_``, ``net_``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_ssl.errors import ConfigError, InputError, NotFittedError
from wsi_ssl.mil import MILClassifier
from wsi_ssl.pretrain import SlideSSL
from wsi_ssl.store import TileStore

DIM = 6


def _bags(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    bags, coords, y = [], [], np.arange(n) % 2
    for i in range(n):
        t = int(rng.integers(5, 12))
        f = rng.normal(size=(t, DIM)).astype(np.float32)
        if y[i]:
            f[0] += 3.0
        bags.append(f)
        coords.append(np.stack([np.arange(t) % 4, np.arange(t) // 4], 1).astype(np.float32))
    return bags, coords, y


def _old_mil_attention(clf, feats, grid):
    x = torch.from_numpy((feats - clf.mean_) / clf.scale_).to(clf.device_)
    c = torch.from_numpy(grid.astype(np.float32)).to(clf.device_)
    with torch.no_grad():
        att = clf.head_(x[None], None, c[None]).attention
    return att[0].double().cpu().numpy()


def _old_mil_logodds(clf, feats, grid, col):
    x = torch.from_numpy((feats - clf.mean_) / clf.scale_).to(clf.device_)
    c = torch.from_numpy(grid.astype(np.float32)).to(clf.device_)
    with torch.no_grad():
        lp = torch.log_softmax(clf.head_(x[:, None], None, c[:, None]).logits.double(), dim=-1)
    rest = torch.logsumexp(torch.cat([lp[:, :col], lp[:, col + 1:]], 1), dim=1)
    return (lp[:, col] - rest).cpu().numpy().astype(np.float32)


@pytest.mark.parametrize("head", ["abmil", "gated_abmil", "dsmil", "transmil", "sparseconv"])
def test_mil_public_methods_equal_the_old_heatmap_computation(head):
    bags, coords, y = _bags()
    clf = MILClassifier(head, embed_dim=8, epochs=2, batch_size=8, device="cpu", seed=0)
    clf.fit(bags, y, coords=coords)
    feats, grid = bags[1], coords[1]
    att = clf.attention(feats, coords=grid)
    assert att.shape == (len(feats),) and att.dtype == np.float32
    np.testing.assert_array_equal(att, _old_mil_attention(clf, feats, grid).astype(np.float32))
    assert att.sum() == pytest.approx(1.0, abs=1e-5)
    for target, col in ((None, 1), (0, 0)):
        np.testing.assert_array_equal(clf.tile_scores(feats, coords=grid, target_class=target),
                                      _old_mil_logodds(clf, feats, grid, col))


def test_mil_heads_without_attention_are_refused_but_tile_scores_work():
    bags, coords, y = _bags()
    for head, kw in (("mean", {}), ("max", {}), ("sparseconv", {"pooling": "mean"})):
        clf = MILClassifier(head, epochs=1, device="cpu", head_kwargs=kw or None)
        clf.fit(bags, y, coords=coords)
        with pytest.raises(ConfigError, match=rf"^MILClassifier head '{head}' has no attention "
                                              r"weights.*abmil, gated_abmil"):
            clf.attention(bags[0], coords=coords[0])
        scores = clf.tile_scores(bags[0], coords=coords[0])
        assert scores.shape == (len(bags[0]),) and np.isfinite(scores).all()
    with pytest.raises(ConfigError, match="target_class=7"):
        clf.tile_scores(bags[0], coords=coords[0], target_class=7)
    with pytest.raises(NotFittedError):
        MILClassifier("abmil").attention(bags[0])
    with pytest.raises(InputError, match="needs coords"):
        MILClassifier("sparseconv", epochs=1, device="cpu").fit(
            bags, y, coords=coords).tile_scores(bags[0])


@pytest.fixture(scope="module")
def slide_store(tmp_path_factory):
    rng = np.random.default_rng(1)
    store = TileStore(tmp_path_factory.mktemp("ssl") / "s.zarr", mode="a")
    store.bind_encoder("e", "fp-e", DIM)
    xy = np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 224
    for i in range(6):
        f = rng.normal(size=(16, DIM)) + (i % 2)
        vi = np.stack([rng.choice(16, 6, replace=False) for _ in range(2)])
        store.write_slide(f"s{i}", f, xy, views=f[vi], view_index=vi,
                          attrs={"stride_level0": 224}, dtype="float32")
    return store


@pytest.mark.parametrize("head", ["abmil", "sparseconv"])
def test_slide_ssl_attention_equals_the_old_heatmap_computation(slide_store, head):
    model = SlideSSL(head, tiles_per_view=4, batch_size=4, epochs=1, embed_dim=8,
                     proj_dims=(8, 4), warmup_epochs=0, device="cpu").fit(slide_store)
    feats = np.asarray(slide_store.read_features("s1"), np.float32)
    grid = (np.asarray(slide_store.read_coords("s1")) / 224).astype(np.float32)
    net = model.net_
    x = (torch.from_numpy(feats) - net.feat_mean) / net.feat_std
    with torch.no_grad():
        old = net.head(x[None], None, torch.from_numpy(grid)[None]).attention[0].numpy()
    att = model.attention(feats, coords=grid)
    np.testing.assert_array_equal(att, old.astype(np.float32))
    assert att.shape == (16,) and att.sum() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InputError, match=r"bag has shape \(16, 5\)"):
        model.attention(feats[:, :5], coords=grid)


def test_slide_ssl_head_without_attention_is_refused(slide_store):
    model = SlideSSL("mean", tiles_per_view=4, batch_size=4, epochs=1, embed_dim=8,
                     proj_dims=(8, 4), warmup_epochs=0, device="cpu").fit(slide_store)
    with pytest.raises(ConfigError, match=r"^SlideSSL head 'mean' has no attention weights"):
        model.attention(np.zeros((3, DIM), np.float32))
    with pytest.raises(NotFittedError):
        SlideSSL().attention(np.zeros((3, DIM), np.float32))
