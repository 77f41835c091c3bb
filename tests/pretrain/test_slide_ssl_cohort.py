"""SlideSSL on a real generated cohort (rendered H&E-like slides -> tiny-cnn tile features with a
view bank): the slide label lives in 3-15 % of the tissue, decoys look alike in both classes, and
mean pooling of the tile features is diluted. A linear probe on SlideSSL embeddings must beat one
on mean-pooled features by a wide margin (benchmarks/bench_slide_ssl.py measures the same gap on
128 slides, with supervised ABMIL too)."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.datasets import make_cohort
from wsi_ssl.eval import linear_probe
from wsi_ssl.pretrain import SlideSSL, mean_pool_embeddings
from wsi_ssl.store import SlideEmbeddings, TileStore
from wsi_ssl.tiling import embed_slides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl-cohort")
    cohort = make_cohort(root / "cohort", n_slides=40, size=(2048, 2048), seed=0, n_workers=2)
    embed_slides(cohort.slides_dir, "tiny-cnn", root / "tiles.zarr", tile_size=112, views=8,
                 view_tiles=32, device="cpu", n_workers=1, seed=0)
    return TileStore(root / "tiles.zarr", mode="r"), cohort.labels


def _cv_auc(emb: SlideEmbeddings, labels) -> float:
    """Mean AUC of 5 shuffled 4-fold cross-validated linear probes (wsi_ssl.eval.linear_probe)."""
    return float(np.mean([
        linear_probe(emb, labels, n_labeled=(), folds=4, groups=None, C=1.0, n_bootstrap=0,
                     seed=s).cv.auc_mean
        for s in range(5)]))


@pytest.mark.parametrize("head", ["sparseconv", "abmil"])
def test_slide_ssl_beats_mean_pooling_on_a_minority_label(cohort_store, head):
    store, labels = cohort_store
    assert 15 <= labels["label"].sum() <= 25
    mean_pool = mean_pool_embeddings(store)
    model = SlideSSL(head, tiles_per_view=32, epochs=100, batch_size=32, lr=1e-3,
                     temperature=0.1, warmup_epochs=5, embed_dim=128, proj_dims=(128, 64),
                     device="cpu", seed=0).fit(store)
    auc_ssl, auc_mean = _cv_auc(model.transform(store), labels), _cv_auc(mean_pool, labels)
    assert auc_ssl > 0.7 and auc_ssl > auc_mean + 0.15, (auc_ssl, auc_mean)
    assert model.history_[-1] < model.history_[0] - 0.3
    print(f"{head}: AUC slide SSL {auc_ssl:.3f}, mean pooling {auc_mean:.3f}")
