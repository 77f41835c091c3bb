"""The 95 % intervals (a patient bootstrap that refits): the formula, the resampling, the
"no feature was kept" report, and their calibration on null and planted data against the
previous method (a bootstrap of one model's held-out predictions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from tests.eval import calibration as cal
from wsi_ssl.eval import survival
from wsi_ssl.eval._stats import (
    INTERVAL_METHOD,
    bootstrap_rows,
    group_folds,
    refit_interval,
)


def test_refit_interval_is_the_documented_formula():
    runs = np.array([0.60, 0.64, 0.58, 0.66])
    boot = np.random.default_rng(0).normal(0.6, 0.05, size=40)
    ci = refit_interval(runs, boot, null=0.5)
    s2, v = np.var(runs, ddof=1), np.var(boot, ddof=1)
    se = np.sqrt(max(v - (1 - 1 / 4) * s2, s2 / 4))
    q = stats.t.ppf(0.975, 39)
    assert ci.estimate == pytest.approx(runs.mean())
    assert (ci.low, ci.high) == pytest.approx((runs.mean() - q * se, runs.mean() + q * se))
    assert ci.p_value == pytest.approx(2 * stats.t.sf((runs.mean() - 0.5) / se, 39))
    # one run: the plain normal bootstrap interval; identical values: a zero-width interval
    one = refit_interval([0.6], boot, null=0.5)
    assert one.std_error == pytest.approx(np.sqrt(v))
    zero = refit_interval([0.0, 0.0], np.zeros(20), null=0.0)
    assert (zero.low, zero.high, zero.p_value) == (0.0, 0.0, 1.0)
    # too few successful resamples: no interval, said by NaN
    assert np.isnan(refit_interval(runs, [0.5] * 5 + [np.nan] * 30).low)


def test_bootstrap_rows_resample_whole_patients_within_classes():
    g = np.repeat(np.arange(30), 2)  # 30 patients x 2 slides
    y = (np.arange(60) < 20).astype(int)  # 10 patients of class 1
    for rows in bootstrap_rows(g, y, 20, np.random.default_rng(0)):
        assert len(rows) == 60 and np.bincount(y[rows]).tolist() == [40, 20]
        drawn = g[rows]
        for p in np.unique(drawn):  # a patient comes with both slides, as often as drawn
            assert np.sum(drawn == p) % 2 == 0
            assert set(rows[drawn == p]) == {2 * p, 2 * p + 1}


def test_group_folds_keep_groups_together_and_balance_strata():
    rng = np.random.default_rng(1)
    g = rng.integers(0, 40, size=120)
    y = (g % 3 == 0).astype(int)
    folds = group_folds(y, g, 5, seed=3)
    test_of = np.full(len(g), -1)
    for k, (tr, te) in enumerate(folds):
        assert not set(g[tr]) & set(g[te])
        test_of[te] = k
    assert (test_of >= 0).all()
    per_fold = [len(set(g[te][y[te] == 1])) for _, te in folds]
    assert max(per_fold) - min(per_fold) <= 1  # class-1 patients dealt evenly


def test_no_feature_kept_is_said_in_words(cohort):
    """A penalty that zeroes every coefficient: the report says so instead of '0.500 ± 0.000
    [0.500-0.500], log-rank p = nan'."""
    emb, table = cohort
    rep = survival(emb, table, folds=3, alpha=50.0, l1_ratio=0.5, n_bootstrap=10)
    assert rep.no_feature_kept
    assert rep.note == "no feature was kept: no prognostic signal found"
    assert rep.summary.startswith("no feature was kept: no prognostic signal found")
    assert "0.500 ± 0.000" not in rep.summary
    data = json.loads(rep.to_json())
    assert data["no_feature_kept"] is True and data["note"] == rep.note
    kept = survival(emb, table, folds=3, alpha=0.05, l1_ratio=0.5, n_bootstrap=10)
    assert not kept.no_feature_kept and kept.note == ""
    assert INTERVAL_METHOD == data["interval_method"] and "bootstrap" in kept.summary


# -- calibration ----------------------------------------------------------------------------------
# Binomial-aware thresholds: a calibrated 95 % interval excludes the null with probability 0.05;
# over n seeds, P(X > k) is small for the k used, while the previous method (measured 13-22 %)
# exceeds it. Seeds are fixed, so each test is deterministic.


def _limit(n: int, p: float = 0.05, alpha: float = 0.01) -> int:
    """The largest count k with P(X > k) >= alpha for X ~ Binomial(n, p): more than k
    exclusions is evidence (at level alpha) against a rate of p."""
    return int(stats.binom.ppf(1 - alpha, n, p))


def test_probe_cv_interval_calibrated_and_old_one_is_not():
    """The issue's case (100 slides of noise, 32 dims, random labels, C = 1, 5-fold CV)."""
    n = 12
    rates = cal.rate("probe-cv", range(n))
    assert rates["new"] * n <= _limit(n)
    assert rates["old"] >= 2 / n  # the previous interval excludes chance on noise
    assert rates["old"] > rates["new"]


def test_compare_noise_files_pairs_cover_zero():
    n = 6
    assert cal.rate("compare-cv", range(n))["new"] * n <= _limit(n, p=0.07)


@pytest.mark.calibration
@pytest.mark.parametrize("kind, n", [("probe-cv", 200), ("compare-cv", 100)])
def test_full_calibration(kind, n):
    """The full check of issue 23: the interval excludes the null in at most 7 % of the seeds
    (probe CV: 200 seeds, the previous method fails it; compare's paired difference of two
    independent noise files: 100 seeds, i.e. it covers 0 in at least 93 %). About 5 and 6
    minutes on a loaded 2-core machine."""
    rates = cal.rate(kind, range(n))
    assert rates["new"] <= 0.07
    if "old" in rates:
        assert rates["old"] > 0.07
