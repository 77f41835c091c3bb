"""survival keeps a planted prognostic signal: out-of-fold C-index next to the oracle's at 16, 128
and 512 dimensions, chance on pure noise, failed fits and convergence warnings counted."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wsi_ssl.eval import survival
from wsi_ssl.eval._stats import cindex_weighted
from wsi_ssl.store import SlideEmbeddings

SEEDS = (0, 1)


def planted(dim: int, seed: int, mode: str, n_patients: int = 150):
    """Two slides per patient. Every dimension but the first four follows 8 strong shared
    factors (variance ~30); the first four are independent, low-variance (sd 0.3) patient traits.
    The hazard is ``exp(1.5 * f0 / 0.3)`` (``"low-variance"``: one trait, a direction PCA drops)
    or a weighted sum of all four (``"spread"``). Exponential censoring, ~35 % censored."""
    rng = np.random.default_rng(seed)
    pats = np.repeat(np.arange(n_patients), 2)
    n = len(pats)
    k = min(8, dim - 4)
    x = rng.normal(size=(n_patients, k))[pats] @ (2.0 * rng.normal(size=(k, dim)))
    x += rng.normal(size=(n, dim))
    traits = 0.3 * rng.normal(size=(n_patients, 4))
    x[:, :4] = traits[pats] + 0.03 * rng.normal(size=(n, 4))
    w = np.array([1.5, 0, 0, 0]) if mode == "low-variance" else np.array([0.8, -0.8, 0.8, 0.8])
    risk = traits @ w / 0.3
    t_event = rng.exponential(1.0 / np.exp(risk))
    t_cens = rng.exponential(2.0 * np.median(t_event), size=n_patients)
    ids = [f"TCGA-P{p % 10}-{p:04d}-01Z-00-DX{s + 1}" for p, s in zip(pats, np.tile([0, 1], n_patients), strict=True)]
    table = pd.DataFrame({"slide_id": ids, "time": np.minimum(t_event, t_cens)[pats],
                          "event": (t_event <= t_cens)[pats].astype(int)})
    return SlideEmbeddings(tuple(ids), x.astype(np.float32), {"source": "planted"}), table, risk[pats]


def oracle_cindex(report, true_risk: np.ndarray) -> float:
    """Mean over the same outer folds of the C-index of the true risk."""
    t, e, fold = np.asarray(report.time), np.asarray(report.event), np.asarray(report.cv_fold)
    return float(np.mean([cindex_weighted(t[fold == f], e[fold == f], true_risk[fold == f],
                                          np.ones((1, int((fold == f).sum()))))[0]
                          for f in range(len(report.folds))]))


@pytest.mark.parametrize("mode", ["low-variance", "spread"])
@pytest.mark.parametrize("dim", [16, 128, 512])
def test_planted_signal_is_recovered(dim, mode):
    gaps = []
    for seed in SEEDS:
        emb, table, risk = planted(dim, seed, mode)
        rep = survival(emb, table, n_bootstrap=0, seed=seed)
        gaps.append(oracle_cindex(rep, risk) - rep.c_index_mean)
        assert rep.failed_fits == 0 and rep.convergence_warnings == 0
        assert all(f.n_features == dim for f in rep.folds)
    assert np.mean(gaps) < 0.03, gaps


def test_old_pca_default_loses_the_low_variance_signal():
    """The reason for the default: 8 PCA components keep the shared factors and drop f0."""
    emb, table, risk = planted(128, 0, "low-variance")
    pca = survival(emb, table, n_components=8, alpha=0.05, l1_ratio=0.5, n_bootstrap=0)
    full = survival(emb, table, alpha=0.05, l1_ratio=0.5, n_bootstrap=0)
    assert abs(pca.c_index_mean - 0.5) < 0.08  # the signal is gone
    assert oracle_cindex(full, risk) - full.c_index_mean < 0.03


def test_pure_noise_interval_covers_chance():
    emb, table, _ = planted(16, 3, "low-variance", n_patients=100)
    perm = np.repeat(2 * np.random.default_rng(7).permutation(100), 2)  # whole patients
    table = table.assign(time=table["time"].to_numpy()[perm],
                         event=table["event"].to_numpy()[perm])
    rep = survival(emb, table, n_bootstrap=30)
    lo, hi = rep.c_index_ci
    assert lo <= 0.5 <= hi
    assert abs(rep.c_index_mean - 0.5) < 0.08


def test_failed_inner_fits_are_counted_not_scored(caplog):
    """30 PCA components fit the outer training folds (~32 patients) but not the inner ones
    (~21): every inner fit fails; each is counted and the fold falls back to the largest
    penalty instead of a silent C-index of 0.5."""
    emb, table, _ = planted(64, 1, "low-variance", n_patients=40)
    one = table.groupby(table["slide_id"].str[:12]).head(1)
    with caplog.at_level("WARNING", logger="wsi_ssl.eval._survival"):
        rep = survival(emb, one, n_components=30, alpha=[0.5, 0.1], l1_ratio=0.5,
                       n_bootstrap=0)
    assert [f.failed_fits for f in rep.folds] == [2 * 3] * 5  # 2 candidates x 3 inner folds
    assert all(f.alpha == 0.5 for f in rep.folds)  # the largest penalty
    assert rep.failed_fits == 30 and "30 failed inner fits" in rep.summary
    assert json.loads(rep.to_json())["failed_fits"] == 30
    assert "every inner fit failed" in caplog.text and "30 inner fits failed" in caplog.text


def test_convergence_warnings_are_counted():
    emb, table, _ = planted(16, 2, "spread", n_patients=40)
    rep = survival(emb, table, alpha=0.01, l1_ratio=0.5, max_iter=2, n_bootstrap=0)
    assert all(f.convergence_warnings >= 1 for f in rep.folds)
    assert f"{rep.convergence_warnings} convergence warnings" in rep.summary
    clean = survival(emb, table, alpha=0.01, l1_ratio=0.5, n_bootstrap=0)
    assert clean.convergence_warnings == 0
