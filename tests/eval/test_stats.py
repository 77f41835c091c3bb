"""The vectorised weighted metrics against scikit-learn and lifelines."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from wsi_ssl.eval._stats import (
    auc_weighted,
    balanced_accuracy_weighted,
    cindex_weighted,
    cluster_bootstrap_weights,
    macro_auc_weighted,
    percentile_ci,
)


@pytest.fixture()
def rng():
    return np.random.default_rng(7)


def test_auc_matches_sklearn_with_ties_and_weights(rng):
    n = 80
    y = rng.integers(0, 2, n)
    s = np.round(rng.normal(size=n) + y, 1)  # many ties
    w = rng.integers(0, 4, (5, n)).astype(float)
    assert auc_weighted(y == 1, s, np.ones((1, n)))[0] == pytest.approx(roc_auc_score(y, s),
                                                                        abs=1e-12)
    ours = auc_weighted(y == 1, s, w)
    ref = [roc_auc_score(y, s, sample_weight=wi) for wi in w]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_auc_is_nan_without_both_classes():
    out = auc_weighted(np.array([True, True, False]), np.array([0.1, 0.2, 0.3]),
                       np.array([[1.0, 1.0, 0.0]]))
    assert np.isnan(out[0])


def test_macro_auc_and_balanced_accuracy_match_sklearn(rng):
    n = 90
    y = rng.integers(0, 3, n)
    proba = rng.dirichlet(np.ones(3), n)
    ones = np.ones((1, n))
    assert macro_auc_weighted(y, proba, ones)[0] == pytest.approx(
        roc_auc_score(y, proba, multi_class="ovr", average="macro"), abs=1e-12)
    pred = proba.argmax(1)
    assert balanced_accuracy_weighted(y, pred, 3, ones)[0] == pytest.approx(
        balanced_accuracy_score(y, pred), abs=1e-12)
    w = rng.integers(1, 3, (1, n)).astype(float)
    assert balanced_accuracy_weighted(y, pred, 3, w)[0] == pytest.approx(
        balanced_accuracy_score(y, pred, sample_weight=w[0]), abs=1e-12)


def test_cindex_matches_lifelines_with_tied_times_and_risks(rng):
    n = 70
    t = rng.integers(1, 12, n).astype(float)
    e = rng.integers(0, 2, n)
    r = np.round(rng.normal(size=n), 1)
    assert cindex_weighted(t, e, r, np.ones((1, n)))[0] == pytest.approx(
        concordance_index(t, -r, e), abs=1e-12)
    # integer weights = duplicated rows
    w = rng.integers(0, 3, n)
    rep = np.repeat(np.arange(n), w)
    assert cindex_weighted(t, e, r, w[None].astype(float))[0] == pytest.approx(
        concordance_index(t[rep], -r[rep], e[rep]), abs=1e-12)


def test_cluster_bootstrap_resamples_patients_not_slides(rng):
    groups = np.array(["p1", "p1", "p2", "p3", "p3", "p3"])
    w = cluster_bootstrap_weights(groups, 200, rng)
    assert w.shape == (200, 6)
    # slides of one patient always share the draw count; 3 patients drawn per resample
    assert (w[:, 0] == w[:, 1]).all() and (w[:, 3] == w[:, 5]).all()
    per_patient = w[:, [0, 2, 3]]
    assert (per_patient.sum(axis=1) == 3).all()
    assert len({tuple(row) for row in per_patient}) > 3


def test_percentile_ci_ignores_nan_and_needs_samples():
    s = np.r_[np.linspace(0, 1, 101), np.nan]
    lo, hi = percentile_ci(s)
    assert lo == pytest.approx(0.025) and hi == pytest.approx(0.975)
    assert np.isnan(percentile_ci(np.array([0.5, np.nan]))[0])
