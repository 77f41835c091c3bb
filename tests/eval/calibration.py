"""Calibration of the evaluation intervals on null and planted data (shared by
``tests/eval/test_intervals.py`` and ``benchmarks/bench_intervals.py``).

Each ``*_run(seed, planted)`` returns ``{method: (low, high)}`` for one seeded dataset: the
interval of today's method (``"new"``: corrected resampled t over repeated, refitted splits) and
of the previous one (``"old"``: a patient bootstrap of one set of held-out predictions, kept here
only to show that it fails). :func:`rate` turns many runs into "excludes the null" rates.

Data (small and cheap on purpose, so 200 seeds take a couple of minutes):

* probe: 100 slides x 32 dims of N(0, 1) noise, random balanced labels, C = 1 (the case of
  issue 23); planted: the label shifts one dimension by ``PROBE_EFFECT``.
* survival: 8 dims of noise against the *real* survival times and events of scikit-survival's
  bundled breast-cancer table (198 patients, 51 events; the TCGA-COADREAD table of the issue is
  not in ``../shared/data``); planted: times drawn from a hazard ``exp(SURV_EFFECT * x0)``
  with the real censoring pattern. Fixed penalty (``alpha=0.05, l1_ratio=0.5``), no search, 1 x 5-fold CV.
* compare: two independent noise files of the probe's size against random labels; the paired
  CV difference of AUC must cover 0.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from wsi_ssl.eval import linear_probe, survival
from wsi_ssl.eval._stats import (
    cindex_weighted,
    cluster_bootstrap_weights,
    macro_auc_weighted,
    percentile_ci,
)
from wsi_ssl.store import SlideEmbeddings

N_PROBE, DIM_PROBE = 100, 32
PROBE_EFFECT = 0.6
FEW_SHOT_N, FEW_SHOT_REPEATS = 40, 10
DIM_SURV = 8
SURV_EFFECT = 0.45
SURV_FIT = dict(alpha=0.05, l1_ratio=0.5)
#: Resamples per interval in the calibration runs (the default is 50; fewer keep 200 seeds
#: affordable, and the t(B-1) quantile accounts for them).
N_BOOT = 20


# -- the previous method, kept only to measure it --------------------------------------------------
def old_cv_interval(report, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The previous CV interval: each fold's held-out patients resampled on their own (1,000
    patient-bootstrap resamples of the out-of-fold probabilities of ONE k-fold CV), percentile
    interval of the mean AUC over folds. ``report`` must carry the first repeat's
    ``cv_proba`` / ``cv_fold`` (every report does)."""
    rng = np.random.default_rng(seed)
    y = pd.factorize(pd.Series(report.labels), sort=True)[0]
    fold = np.asarray(report.cv_fold)
    groups = np.asarray(report.patients)
    boot = np.zeros(n_boot)
    k = int(fold.max()) + 1
    for f in range(k):
        m = fold == f
        boot += macro_auc_weighted(y[m], report.cv_proba[m],
                                   cluster_bootstrap_weights(groups[m], n_boot, rng))
    return percentile_ci(boot / k)


def old_survival_interval(report, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The previous survival interval: the same per-fold patient bootstrap of ONE CV's
    out-of-fold risk scores, percentile interval of the mean C-index."""
    rng = np.random.default_rng(seed)
    t, e = np.asarray(report.time), np.asarray(report.event)
    risk, fold = np.asarray(report.risk), np.asarray(report.cv_fold)
    groups = np.asarray(report.patients)
    boot = np.zeros(n_boot)
    k = int(fold.max()) + 1
    for f in range(k):
        m = fold == f
        boot += cindex_weighted(t[m], e[m], risk[m],
                                cluster_bootstrap_weights(groups[m], n_boot, rng))
    return percentile_ci(boot / k)


def old_few_shot_interval(x, y, n: int, seed: int, repeats: int = FEW_SHOT_REPEATS,
                          n_boot: int = 1000) -> tuple[float, float]:
    """The previous few-shot protocol and interval: ONE held-out side (a quarter, stratified),
    ``repeats`` labelled subsets of ``n`` slides scored on it, and a patient bootstrap of that
    held-out side shared by the repeats; percentile interval of the mean AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    tr, te = next(StratifiedKFold(4, shuffle=True, random_state=seed).split(x, y))
    w = cluster_bootstrap_weights(np.arange(len(te)), n_boot, rng)
    boot = np.zeros(n_boot)
    for _ in range(repeats):
        sub = np.concatenate([rng.choice(tr[y[tr] == c], n // 2, replace=False) for c in (0, 1)])
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced"))
        proba = clf.fit(x[sub], y[sub]).predict_proba(x[te])
        boot += macro_auc_weighted(y[te], proba, w)
    return percentile_ci(boot / repeats)


def _effect(planted: float, default: float) -> float:
    if isinstance(planted, bool):
        return default if planted else 0.0
    return float(planted)


# -- data -----------------------------------------------------------------------------------------
def probe_data(seed: int, planted: float, *, n: int = N_PROBE,
               dim: int = DIM_PROBE) -> tuple[SlideEmbeddings, pd.DataFrame]:
    """Noise embeddings and random balanced labels (``planted``: the label shifts dim 0 by
    ``PROBE_EFFECT`` when True, by the number itself when a float)."""
    effect = _effect(planted, PROBE_EFFECT)
    rng = np.random.default_rng(10_000 + seed)
    y = rng.permutation(np.repeat([0, 1], n // 2))
    x = rng.normal(size=(n, dim))
    if effect:
        x[:, 0] += effect * y
    ids = tuple(f"s{i:03d}" for i in range(n))
    return (SlideEmbeddings(ids, x.astype(np.float32), {"source": f"noise-{seed}"}),
            pd.DataFrame({"slide_id": ids, "label": y}))


def real_survival_table() -> pd.DataFrame:
    """Times and events of scikit-survival's bundled breast-cancer table (198 patients, 51
    events; real follow-up, shipped with the package, no download)."""
    from sksurv.datasets import load_breast_cancer

    _, y = load_breast_cancer()
    return pd.DataFrame({"time": y["t.tdm"].astype(float), "event": y["e.tdm"].astype(int)})


def survival_data(seed: int, planted: float, *,
                  dim: int = DIM_SURV) -> tuple[SlideEmbeddings, pd.DataFrame]:
    """Noise embeddings against the real times and events (``planted``: event times from a
    hazard ``exp(effect * x0)``, censored at the real follow-up of each patient)."""
    effect = _effect(planted, SURV_EFFECT)
    real = real_survival_table()
    rng = np.random.default_rng(20_000 + seed)
    n = len(real)
    x = rng.normal(size=(n, dim))
    table = real.copy()
    if effect:
        base = np.median(real["time"])
        t_event = rng.exponential(base / np.log(2) * np.exp(-effect * x[:, 0]))
        follow = np.where(real["event"] == 1, np.inf, real["time"])  # real censoring times
        table["time"] = np.minimum(t_event, np.minimum(follow, real["time"].max()))
        table["event"] = (t_event <= np.minimum(follow, real["time"].max())).astype(int)
    ids = tuple(f"p{i:03d}" for i in range(n))
    table.insert(0, "slide_id", ids)
    return SlideEmbeddings(ids, x.astype(np.float32), {"source": f"noise-{seed}"}), table


# -- one run each ---------------------------------------------------------------------------------
def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")
    return w


def probe_cv_run(seed: int, planted: float) -> dict[str, tuple[float, float]]:
    """5-fold CV probe (C = 1): the new interval and the old one, on the same folds."""
    emb, table = probe_data(seed, planted)
    rep = linear_probe(emb, table, n_labeled=(), folds=5, C=1.0, groups=None, seed=seed,
                       n_bootstrap=N_BOOT)
    return {"new": rep.cv.auc_ci, "old": old_cv_interval(rep, seed=seed)}


def probe_few_shot_run(seed: int, planted: float) -> dict[str, tuple[float, float]]:
    """Few-shot probe at n = FEW_SHOT_N (C = 1), 10 repeats: new and old protocol."""
    emb, table = probe_data(seed, planted)
    rep = linear_probe(emb, table, n_labeled=(FEW_SHOT_N,), repeats=FEW_SHOT_REPEATS,
                       folds=None, C=1.0, groups=None, seed=seed, n_bootstrap=N_BOOT)
    x = emb.embeddings.astype(np.float64)
    y = table["label"].to_numpy()
    return {"new": rep.results[0].auc_ci, "old": old_few_shot_interval(x, y, FEW_SHOT_N, seed)}


def survival_run(seed: int, planted: float) -> dict[str, tuple[float, float]]:
    """Penalised Cox (fixed penalty), 5-fold: the new and the old interval, same folds."""
    emb, table = survival_data(seed, planted)
    rep = survival(emb, table, seed=seed, n_bootstrap=N_BOOT, **SURV_FIT)
    return {"new": rep.c_index_ci, "old": old_survival_interval(rep, seed=seed)}


def compare_run(seed: int, planted: float = False) -> dict[str, tuple[float, float]]:
    """Two independent noise files (``planted``: the second carries the label) against the
    same random labels: the paired CV difference of AUC (``b - a``)."""
    from wsi_ssl.eval import compare_embeddings

    a, table = probe_data(seed, False)
    b, _ = probe_data(seed + 5_000, False)
    if _effect(planted, PROBE_EFFECT):
        x = b.embeddings.copy()
        x[:, 0] += _effect(planted, PROBE_EFFECT) * table["label"].to_numpy()
        b = SlideEmbeddings(b.slide_ids, x, b.provenance)
    rep = compare_embeddings({"a": a, "b": b}, table, n_labeled=(), C=1.0, groups=None,
                             seed=seed, n_bootstrap=N_BOOT)
    d = rep.difference("cv", "b", "a")
    return {"new": (d.low, d.high)}


RUNS = {"probe-cv": (probe_cv_run, 0.5), "probe-few-shot": (probe_few_shot_run, 0.5),
        "survival": (survival_run, 0.5), "compare-cv": (compare_run, 0.0)}


def rate(kind: str, seeds, planted: float = False) -> dict[str, float]:
    """Fraction of ``seeds`` whose interval excludes the null (0.5, or 0 for a difference),
    per method; with ``planted`` (True: the default effect, or an effect size) the power."""
    run, null = RUNS[kind]
    hits: dict[str, list[bool]] = {}
    w = _quiet()
    try:
        for s in seeds:
            for method, (lo, hi) in run(int(s), planted).items():
                hits.setdefault(method, []).append(bool(lo > null or hi < null))
    finally:
        w.__exit__(None, None, None)
    return {m: float(np.mean(v)) for m, v in hits.items()}
