"""linear_probe: the Giga-SSL reference check, quality on seeded signal, patient grouping,
reports and every label/config error."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from wsi_ssl.errors import ConfigError, InputError, LabelError
from wsi_ssl.eval import ProbeReport, linear_probe
from wsi_ssl.eval._probe import C_GRID
from wsi_ssl.store import SlideEmbeddings

FAST = dict(n_bootstrap=20, C=1.0)


def test_giga_ssl_reference_equals_direct_sklearn(cohort):
    """linear_probe(..., C=10, groups=None) == StandardScaler + LogisticRegression(C=10,
    balanced) on StratifiedKFold(5, shuffle=True, random_state=seed) folds, AUC per fold."""
    emb, table = cohort
    report = linear_probe(emb, table, C=10, groups=None, n_labeled=(), folds=5, seed=3,
                          n_bootstrap=0)
    x = emb.embeddings.astype(np.float64)
    y = (table["label"] == "tumor").to_numpy().astype(int)  # classes sorted: normal, tumor
    aucs, fold_of = [], np.full(len(y), -1)
    for f, (tr, te) in enumerate(StratifiedKFold(5, shuffle=True, random_state=3).split(x, y)):
        clf = make_pipeline(StandardScaler(),
                            LogisticRegression(C=10, class_weight="balanced", max_iter=1000))
        clf.fit(x[tr], y[tr])
        aucs.append(roc_auc_score(y[te], clf.predict_proba(x[te])[:, 1]))
        fold_of[te] = f
    cv = report.cv
    assert cv is not None and cv.runs == 5 and set(cv.C) == {10.0}
    np.testing.assert_allclose(cv.auc_runs, aucs, rtol=0, atol=1e-9)
    assert abs(cv.auc_mean - np.mean(aucs)) < 1e-9
    assert list(report.cv_fold) == fold_of.tolist()
    assert report.classes == ("normal", "tumor")


def test_signal_gives_high_auc_and_shuffled_labels_chance(cohort):
    emb, table = cohort
    report = linear_probe(emb, table, n_labeled=(10, 30, None), repeats=4, **FAST)
    frame = report.to_frame()
    assert list(frame["setting"]) == ["few-shot"] * 3 + ["cv"]
    assert report.cv.auc_mean > 0.85
    assert frame["auc_mean"].iloc[2] > 0.85  # whole training side
    assert frame["auc_mean"].iloc[0] > 0.7  # 10 labelled slides
    for r in report.results:
        lo, hi = r.auc_ci
        assert lo < hi and lo - 1e-9 <= r.auc_mean <= hi + 1e-9
        blo, bhi = r.bacc_ci
        assert blo - 1e-9 <= r.bacc_mean <= bhi + 1e-9
    assert report.cv.bacc_mean > 0.75 and frame["bacc_mean"].iloc[2] > 0.75
    shuffled = table.assign(label=np.random.default_rng(5).permutation(table["label"].to_numpy()))
    null = linear_probe(emb, shuffled, n_labeled=(30,), repeats=4, **FAST)
    for r in null.results:
        assert abs(r.auc_mean - 0.5) < 0.15
        assert r.auc_ci[0] < 0.5 + 0.05  # the CI does not exclude chance by a margin


def test_multiclass_uses_ovr_macro_auc(cohort3):
    emb, table = cohort3
    report = linear_probe(emb, table, n_labeled=(), folds=4, **FAST)
    assert report.task == "multiclass" and report.classes == ("A", "B", "C")
    assert report.cv.auc_mean > 0.75
    codes = pd.factorize(table["label"], sort=True)[0]
    folds = np.asarray(report.cv_fold)
    per_fold = [roc_auc_score(codes[folds == f], report.cv_proba[folds == f], multi_class="ovr",
                              average="macro") for f in range(4)]
    np.testing.assert_allclose(report.cv.auc_runs, per_fold, atol=1e-12)
    np.testing.assert_allclose(report.cv_proba.sum(axis=1), 1.0, atol=1e-9)


def _patients(report, mask):
    return {p for p, m in zip(report.patients, mask, strict=True) if m}


def test_no_patient_on_both_sides(cohort):
    emb, table = cohort
    report = linear_probe(emb, table, n_labeled=(20,), repeats=2, **FAST)
    # TCGA barcode prefix: 12 characters
    assert all(p == s[:12] for p, s in zip(report.patients, report.slide_ids, strict=True))
    assert report.n_patients < report.n_slides  # some patients have 2 slides
    held = np.asarray(report.heldout)
    assert held.any() and (~held).any()
    assert not (_patients(report, held) & _patients(report, ~held))
    folds = np.asarray(report.cv_fold)
    for p in set(report.patients):
        assert len({f for f, q in zip(folds, report.patients, strict=True) if q == p}) == 1
    # the check can fail: without grouping, patients do end up on both sides
    loose = linear_probe(emb, table, n_labeled=(20,), repeats=2, groups=None, **FAST)
    assert loose.patients == loose.slide_ids  # groups=None: every slide on its own
    held = np.asarray(loose.heldout)
    barcode = np.array([s[:12] for s in loose.slide_ids])
    assert set(barcode[held]) & set(barcode[~held])


def test_patient_id_column_overrides_barcode(cohort):
    emb, table = cohort
    table = table.assign(patient_id=[f"P{i // 4}" for i in range(len(table))])
    report = linear_probe(emb, table, n_labeled=(20,), repeats=2, **FAST)
    assert set(report.patients) == set(table["patient_id"])
    held = np.asarray(report.heldout)
    assert not (_patients(report, held) & _patients(report, ~held))


def test_few_shot_subsets_clamp_and_skip_with_warning(cohort):
    emb, table = cohort
    with pytest.warns(UserWarning, match=r"n_labeled=500 is larger than the training side"):
        report = linear_probe(emb, table, n_labeled=(500,), repeats=2, folds=None, **FAST)
    # the smallest training side of the random held-out splits
    n_train = min(report.n_rows - len(te) for te in report.heldout_runs)
    assert len(report.heldout_runs) == 2
    (r,) = report.results
    assert r.requested is None and r.runs == 2  # each split trains on its whole training side
    assert r.n_labeled >= n_train
    with pytest.warns(UserWarning) as record:
        report = linear_probe(emb, table, n_labeled=(None, 1000, 8), repeats=3, folds=None,
                              **FAST)
    messages = [str(w.message) for w in record]
    assert any("clamped to" in m for m in messages)
    assert any("n_labeled=1000 repeats size" in m and "skipped" in m for m in messages)
    n_train = min(report.n_rows - len(te) for te in report.heldout_runs)
    assert report.results[0].n_labeled == 8 and report.results[1].requested is None
    assert report.results[1].n_labeled >= n_train
    assert report.results[0].runs == 3 and len(set(report.results[0].auc_runs)) > 1


def test_inner_cv_picks_the_clearly_best_c():
    """x1 = class shift + a large nuisance, x2 = the same nuisance: only x1 - x2 separates the
    classes, which an (almost) unregularised model finds; C=1e-4 shrinks to the class-mean
    direction (x1 alone, AUC ~0.6). The inner CV must pick C=100 in every fold."""
    rng = np.random.default_rng(0)
    n = 80
    y = np.repeat([0, 1], n // 2)
    nuisance = 5.0 * rng.normal(size=n)
    x = np.c_[y + nuisance + 0.2 * rng.normal(size=n), nuisance + 0.2 * rng.normal(size=n)]
    emb = SlideEmbeddings(tuple(f"s{i}" for i in range(n)), x.astype(np.float32), {})
    table = pd.DataFrame({"slide_id": emb.slide_ids, "label": y})
    rep = linear_probe(emb, table, n_labeled=(), folds=4, C=[1e-4, 100.0], groups=None,
                       n_bootstrap=0)
    assert rep.cv.C == (100.0,) * 4 and rep.cv.auc_mean > 0.95
    small = linear_probe(emb, table, n_labeled=(), folds=4, C=1e-4, groups=None, n_bootstrap=0)
    assert small.cv.auc_mean < 0.8  # the choice matters
    assert set(C_GRID) >= {1e-3, 100.0}
    default = linear_probe(emb, table, n_labeled=(), folds=4, groups=None, n_bootstrap=0)
    assert min(default.cv.C) >= 1.0 and default.cv.auc_mean > 0.95


def test_inner_cv_ties_go_to_the_smallest_c(cohort):
    """Perfectly separable embeddings: every C gives inner AUC 1, so the smallest C wins."""
    emb, table = cohort
    y = (table["label"] == "tumor").to_numpy()
    x = np.c_[np.where(y, 10.0, -10.0), np.random.default_rng(1).normal(size=(len(y), 3))]
    sep = SlideEmbeddings(emb.slide_ids, x.astype(np.float32), {})
    rep = linear_probe(sep, table, n_labeled=(), folds=3, C=[0.5, 2.0, 0.01], n_bootstrap=0)
    assert rep.cv.C == (0.01,) * 3 and rep.cv.auc_mean == 1.0


def test_inputs_as_dataframe_and_files_agree(cohort, tmp_path):
    emb, table = cohort
    ref = linear_probe(emb, table, n_labeled=(), **FAST)
    npz = emb.save(tmp_path / "slides.npz")
    emb.to_pandas().reset_index().to_csv(tmp_path / "slides.csv", index=False)
    table.to_csv(tmp_path / "labels.csv", index=False)
    for e in (npz, tmp_path / "slides.csv", emb.to_pandas()):
        rep = linear_probe(e, tmp_path / "labels.csv", n_labeled=(), **FAST)
        np.testing.assert_allclose(rep.cv.auc_runs, ref.cv.auc_runs, atol=1e-6)


def test_report_frame_json_plot_save(cohort, tmp_path):
    emb, table = cohort
    report = linear_probe(emb, table, n_labeled=(10, None), repeats=2, **FAST)
    assert isinstance(report, ProbeReport)
    frame = report.to_frame()
    assert {"n_labeled", "auc_mean", "auc_std", "auc_ci_low", "auc_ci_high",
            "bacc_mean"} <= set(frame.columns)
    data = json.loads(report.to_json())
    assert data["classes"] == ["normal", "tumor"]
    assert len(data["results"]) == 3 and data["config"]["C"] == 1.0
    assert len(data["splits"]["slide_id"]) == report.n_slides
    fig = report.plot()
    assert len(fig.axes) == 2 and len(fig.axes[1].lines) == len(report.roc) + 1
    paths = report.save(tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["n_slides"] == report.n_slides
    preds = pd.read_csv(paths["predictions"])
    assert list(preds["slide_id"]) == list(table["slide_id"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.task = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- errors


def test_unknown_ids_listed_with_count(cohort):
    emb, table = cohort
    extra = pd.DataFrame({"slide_id": ["nope-1", "nope-2", "nope-3"], "label": "tumor"})
    with pytest.raises(LabelError, match=r"not in the embeddings: \['nope-1', 'nope-2', "
                                         r"'nope-3'\] \(3 in all\)"):
        linear_probe(emb, pd.concat([table, extra]), **FAST)


def test_embedded_slides_without_label_are_left_out(cohort):
    emb, table = cohort
    report = linear_probe(emb, table.iloc[:80], n_labeled=(), folds=3, **FAST)
    assert report.n_slides == 80


@pytest.mark.parametrize("mutate, match", [
    (lambda t: pd.concat([t, t.iloc[:2]]), r"duplicated slide ids in 'slide_id'.*\(2 in all\)"),
    (lambda t: t.assign(label=t["label"].where(t.index > 2)), r"NaN in 'label' for slides \["),
    (lambda t: t.assign(slide_id=t["slide_id"].where(t.index != 4)), r"missing slide ids in column 'slide_id' at rows \['4'\]"),
    (lambda t: t.assign(label="tumor"), r"single class"),
    (lambda t: t.drop(columns="label"), r"no label column 'label'"),
    (lambda t: t.rename(columns={"slide_id": "sid"}), r"no id column 'slide_id'.*--id-col"),
])
def test_label_table_errors(cohort, mutate, match):
    emb, table = cohort
    with pytest.raises(LabelError, match=match):
        linear_probe(emb, mutate(table.copy()), **FAST)


def test_class_smaller_than_folds(cohort):
    emb, table = cohort
    table = table.copy()
    table.loc[table.index[:3], "label"] = "rare"
    with pytest.raises(LabelError, match=r"class 'rare' of column 'label'.* only \d (patients|"
                                         r"slides); folds=5 needs at least 5"):
        linear_probe(emb, table, n_labeled=(), **FAST)


def test_label_table_file_errors(cohort, tmp_path):
    emb, _ = cohort
    with pytest.raises(LabelError, match="does not exist"):
        linear_probe(emb, tmp_path / "missing.csv")
    (tmp_path / "labels.xlsx").write_text("x")
    with pytest.raises(LabelError, match=r"unknown file type '.xlsx'"):
        linear_probe(emb, tmp_path / "labels.xlsx")


def test_nan_embeddings_are_an_input_error(cohort):
    emb, table = cohort
    x = emb.embeddings.copy()
    x[5, 0] = np.nan
    with pytest.raises(InputError, match=re.escape(emb.slide_ids[5])):
        linear_probe(SlideEmbeddings(emb.slide_ids, x), table, **FAST)


@pytest.mark.parametrize("kwargs, match", [
    (dict(repeats=0), r"repeats=0"),
    (dict(test_size=1.5), r"test_size=1.5"),
    (dict(C="auto"), r"C='auto'"),
    (dict(C=-1.0), r"C=-1.0"),
    (dict(n_labeled=(1,)), r"n_labeled entry 1 must be an integer >= the number of classes"),
    (dict(n_labeled=(), folds=None), r"nothing to evaluate"),
    (dict(folds=1), r"folds=1"),
    (dict(groups="site"), r"groups='site'"),
])
def test_config_errors(cohort, kwargs, match):
    emb, table = cohort
    with pytest.raises(ConfigError, match=match):
        linear_probe(emb, table, **{"n_bootstrap": 10, **kwargs})


def test_real_musk1_bag_means(data_dir):
    """Real data: the MUSK1 benchmark (92 bags of 166-d instance features), each bag mean-pooled
    into one 'slide embedding'. A linear probe finds the signal; shuffled labels do not."""
    df = pd.read_csv(data_dir / "mil" / "musk1.csv", header=None)
    emb = df.drop(columns=0).groupby(1).mean()
    emb.index = [f"bag{i}" for i in emb.index]
    labels = pd.DataFrame({"slide_id": emb.index, "label": df.groupby(1)[0].first().to_numpy()})
    report = linear_probe(emb, labels, n_labeled=(), C=10, groups=None, n_bootstrap=20)
    assert report.n_slides == 92 and report.classes == ("0", "1")
    assert report.cv.auc_mean > 0.8 and report.cv.auc_ci[0] > 0.65
    shuffled = labels.assign(label=np.random.default_rng(0).permutation(labels["label"]))
    null = linear_probe(emb, shuffled, n_labeled=(), C=10, groups=None, n_bootstrap=0)
    assert abs(null.cv.auc_mean - 0.5) < 0.15
