"""survival: C-index on embeddings that carry the hazard, folds by patient, preprocessing inside
folds, the penalty search, reports and the clinical-table errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from lifelines.utils import concordance_index

from wsi_ssl.errors import ConfigError, LabelError
from wsi_ssl.eval import SurvivalReport, survival
from wsi_ssl.eval._survival import _fit_fold

FAST = dict(alpha=0.05, l1_ratio=0.5, n_bootstrap=20)


@pytest.fixture(scope="module")
def report(cohort) -> SurvivalReport:
    emb, table = cohort
    return survival(emb, table, **FAST)


def test_hazard_signal_gives_high_cindex(report):
    assert report.c_index_mean > 0.62
    lo, hi = report.c_index_ci
    assert 0.5 < lo < report.c_index_mean < hi
    assert report.logrank_p < 0.01
    assert len(report.folds) == 5 and all(f.alpha == 0.05 for f in report.folds)
    assert all(f.n_features == 16 and 0 < f.n_nonzero <= 16 for f in report.folds)
    assert report.failed_fits == 0 and report.convergence_warnings == 0


def test_shuffled_survival_is_near_chance(cohort):
    emb, table = cohort
    perm = np.random.default_rng(3).permutation(len(table))
    shuffled = table.assign(time=table["time"].to_numpy()[perm],
                            event=table["event"].to_numpy()[perm])
    null = survival(emb, shuffled, **FAST)
    assert abs(null.c_index_mean - 0.5) < 0.1


def test_fold_cindex_equals_lifelines(report):
    risk = report.risk_table()
    for f in report.folds:
        part = risk[risk["cv_fold"] == f.fold]
        ref = concordance_index(part["time"], -part["risk"], part["event"])
        assert f.c_index == pytest.approx(ref, abs=1e-12)
        assert f.n_test == len(part) and f.n_events_test == int(part["event"].sum())


def test_folds_keep_patients_together(report):
    risk = report.risk_table()
    assert (risk.groupby("patient_id")["cv_fold"].nunique() == 1).all()
    assert report.n_patients < report.n_slides
    assert sorted(set(report.cv_fold)) == [0, 1, 2, 3, 4]


def test_scaler_pca_and_search_use_the_training_fold_only(cohort):
    emb, table = cohort
    x = emb.embeddings.astype(np.float64)
    t, e = table["time"].to_numpy(), table["event"].to_numpy()
    g = np.array([s[:12] for s in emb.slide_ids], dtype=object)
    te = np.arange(0, len(t), 5)
    tr = np.setdiff1d(np.arange(len(t)), te)
    kw = dict(alpha="cv", l1_ratio=(0.5, 0.9), n_components=4, grouped=True, inner_folds=3,
              seed=0)
    fit = _fit_fold(x, t, e, g, tr, te, **kw)
    x2 = x.copy()
    x2[te] = 100.0 * np.random.default_rng(0).normal(size=x2[te].shape)
    fit2 = _fit_fold(x2, t, e, g, tr, te, **kw)
    # nothing of the test fold was used: same threshold, penalty and coefficients
    assert fit2.threshold == fit.threshold and fit.n_features == 4
    assert (fit2.alpha, fit2.l1_ratio) == (fit.alpha, fit.l1_ratio)
    np.testing.assert_array_equal(fit2.coef, fit.coef)
    assert np.isfinite(fit2.risk_test).all() and not np.allclose(fit2.risk_test, fit.risk_test)


def test_penalty_search_picks_the_clearly_better_value(cohort):
    """alpha=50 zeroes every coefficient (constant risk, inner C-index 0.5); alpha=0.05 keeps
    the hazard signal: the inner CV must pick 0.05 in every fold."""
    emb, table = cohort
    rep = survival(emb, table, folds=3, alpha=[50.0, 0.05], l1_ratio=0.5, n_bootstrap=0)
    assert [f.alpha for f in rep.folds] == [0.05] * 3
    assert all(f.n_nonzero > 0 for f in rep.folds) and rep.c_index_mean > 0.6
    assert np.isnan(rep.c_index_ci[0])
    zero = survival(emb, table, folds=3, alpha=50.0, l1_ratio=0.5, n_bootstrap=0)
    assert all(f.n_nonzero == 0 for f in zero.folds) and zero.c_index_mean == 0.5


def test_default_search_keeps_the_signal(cohort):
    emb, table = cohort
    rep = survival(emb, table, folds=3, n_bootstrap=0)
    assert rep.c_index_mean > 0.65
    assert {f.l1_ratio for f in rep.folds} <= {0.1, 0.5, 0.9}


def test_report_outputs(report, tmp_path):
    frame = report.to_frame()
    assert list(frame.columns) == ["fold", "n_train", "n_test", "n_events_test", "n_features",
                                   "alpha", "l1_ratio", "n_nonzero", "failed_fits",
                                   "convergence_warnings", "c_index", "repeat"]
    data = json.loads(report.to_json())
    assert data["interval_method"] == report.interval_method and "refit" in data["interval_method"]
    assert len(data["c_index_boot"]) == 20  # one refitted CV per resample
    assert data["n_events"] == report.n_events and len(data["folds"]) == 5
    assert len(data["slides"]["risk"]) == report.n_slides
    fig = report.plot()
    assert len(fig.axes) == 2
    assert "log-rank p" in fig.axes[0].get_title()
    paths = report.save(tmp_path)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert paths["risk"].read_text().startswith("slide_id,patient_id,time,event,risk")
    assert "C-index" in report.summary


def test_high_risk_group_dies_earlier(report):
    risk = report.risk_table()
    high = risk[risk["high_risk"]]
    low = risk[~risk["high_risk"]]
    assert high["event"].mean() > low["event"].mean()
    assert high["time"].median() < low["time"].median()


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.assign(time=t["time"].where(t.index != 3)), r"NaN or non-numeric times in 'time'"),
    (lambda t: t.assign(time=np.where(t.index == 2, -1.0, t["time"])),
     r"negative times in 'time' for slides \['TCGA-.*\] \(1 in all\)"),
    (lambda t: t.assign(event=np.where(t.index < 2, 2, t["event"])),
     r"values not in \{0, 1\} in 'event': values \['2'\].*\(2 in all\)"),
    (lambda t: t.assign(event=t["event"].where(t.index != 0)), r"values not in \{0, 1\}"),
    (lambda t: t.assign(event=np.where(t.index < 3, 1, 0)), r"only \d patients with an event"),
    (lambda t: t.drop(columns="time"), r"no time column 'time'.*--time-col"),
    (lambda t: t.iloc[[0, 0, 1]], r"duplicated slide ids"),
    (lambda t: t.assign(slide_id=["x-" + s for s in t["slide_id"]]),
     r"not in the embeddings: \['x-TCGA.*\(\d+ in all\)"),
])
def test_clinical_table_errors(cohort, mutate, match):
    emb, table = cohort
    with pytest.raises(LabelError, match=match):
        survival(emb, mutate(table.copy()), **FAST)


def test_boolean_events_are_accepted(cohort):
    emb, table = cohort
    rep = survival(emb, table.assign(event=table["event"].astype(bool)), folds=3, **FAST)
    assert rep.n_events == int(table["event"].sum())


@pytest.mark.parametrize("kwargs, match", [
    (dict(folds=1), r"folds=1"),
    (dict(n_components=0), r"n_components=0"),
    (dict(n_components="auto"), r"n_components='auto'"),
    (dict(alpha="auto"), r"alpha='auto'"),
    (dict(alpha=-1.0), r"alpha=-1.0"),
    (dict(l1_ratio=0.0), r"l1_ratio=0.0"),
    (dict(level="case"), r"level='case'"),
    (dict(event="event", censor_col="censored"), r"exclusive"),
])
def test_survival_config_errors(cohort, kwargs, match):
    emb, table = cohort
    with pytest.raises(ConfigError, match=match):
        survival(emb, table, **kwargs)


def test_penalizer_is_a_deprecated_alias_of_alpha(cohort):
    emb, table = cohort
    with pytest.warns(DeprecationWarning, match="use alpha="):
        rep = survival(emb, table, folds=3, penalizer=0.05, l1_ratio=0.5, n_bootstrap=0)
    assert [f.alpha for f in rep.folds] == [0.05] * 3
