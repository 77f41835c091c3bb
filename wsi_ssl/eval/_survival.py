"""Cross-validated Cox survival models on PCA-reduced slide embeddings.

In each of ``folds`` patient-grouped folds (stratified on the event), the training slides fit a
``StandardScaler`` then a ``PCA`` (so nothing of the test fold leaks into the reduction), then a
lifelines ``CoxPHFitter`` with an L2 penalty; the test fold gets a risk score (log partial
hazard). Reported: Harrell's concordance index per fold (mean +- std, patient bootstrap 95 % CI)
and a Kaplan-Meier plot of the out-of-fold high/low risk groups (split at the median training
risk of each fold) with the log-rank p-value.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np

from wsi_ssl.errors import ConfigError, LabelError
from wsi_ssl.eval._inputs import (
    EmbeddingsLike,
    TableLike,
    align,
    as_embeddings,
    few,
    patient_ids,
    read_table,
    single_threaded,
)
from wsi_ssl.eval._stats import cindex_weighted, cluster_bootstrap_weights, percentile_ci
from wsi_ssl.eval._survival_report import SurvivalFold, SurvivalReport

__all__ = ["survival", "SurvivalReport", "SurvivalFold", "PENALIZER_GRID", "DEFAULT_PENALIZER"]

logger = logging.getLogger(__name__)

#: Candidate L2 penalties of the inner cross-validation (``penalizer="cv"``).
PENALIZER_GRID: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
#: Penalty used when a training fold has too few events for the inner CV.
DEFAULT_PENALIZER: float = 0.1


def _auto_components(n_train: int, n_events: int, dim: int) -> int:
    """About one component per 10 training events (the events-per-variable rule), 2 to 32."""
    return int(max(1, min(32, max(2, n_events // 10), dim, n_train - 2)))


def _fit_cox(z: np.ndarray, t: np.ndarray, e: np.ndarray, penalizer: float):
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.exceptions import ConvergenceError

    df = pd.DataFrame(z, columns=[f"pc{i}" for i in range(z.shape[1])])
    df["T"], df["E"] = t, e.astype(int)
    p = float(penalizer)
    for _ in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return CoxPHFitter(penalizer=p, l1_ratio=0.0).fit(df, "T", "E"), p
        except ConvergenceError:
            logger.warning("CoxPHFitter did not converge with penalizer=%g; retrying with %g.",
                           p, p * 10)
            p *= 10
    raise ConfigError(
        f"the Cox model did not converge even with penalizer={p:g}; use fewer n_components or "
        "a larger penalizer."
    )


def _risk(model, z: np.ndarray) -> np.ndarray:
    import pandas as pd

    df = pd.DataFrame(z, columns=[f"pc{i}" for i in range(z.shape[1])])
    return np.asarray(model.predict_log_partial_hazard(df), np.float64).ravel()


def _reduce(x_tr, x_te, k, seed):
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(x_tr)
    pca = PCA(n_components=k, random_state=seed).fit(sc.transform(x_tr))
    return pca.transform(sc.transform(x_tr)), pca.transform(sc.transform(x_te))


def _splits(n_splits, t, e, g, grouped, seed):
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    x = np.zeros((len(t), 1))
    if grouped:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(cv.split(x, e.astype(int), g))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(x, e.astype(int)))


def _fit_fold(x, t, e, g, tr, te, *, penalizer, n_components, grouped, inner_folds, seed):
    k = (_auto_components(len(tr), int(e[tr].sum()), x.shape[1])
         if n_components == "auto" else min(int(n_components), x.shape[1], len(tr) - 2))
    if isinstance(penalizer, (str, Sequence)) and (
            len(np.unique(g[tr][e[tr] == 1])) < inner_folds):
        pen = DEFAULT_PENALIZER
    elif isinstance(penalizer, (str, Sequence)):
        grid = PENALIZER_GRID if isinstance(penalizer, str) else tuple(map(float, penalizer))
        scores = np.zeros(len(grid))
        for itr, ite in _splits(inner_folds, t[tr], e[tr], g[tr], grouped, seed):
            itr, ite = tr[itr], tr[ite]
            z_tr, z_te = _reduce(x[itr], x[ite], min(k, len(itr) - 2), seed)
            for i, p in enumerate(grid):
                try:
                    model, _ = _fit_cox(z_tr, t[itr], e[itr], p)
                    c = cindex_weighted(t[ite], e[ite], _risk(model, z_te), np.ones((1, len(ite))))
                    scores[i] += np.nan_to_num(c[0], nan=0.5)
                except ConfigError:
                    scores[i] += 0.0
        pen = float(grid[int(np.argmax(scores))])
    else:
        pen = float(penalizer)
    z_tr, z_te = _reduce(x[tr], x[te], k, seed)
    model, pen = _fit_cox(z_tr, t[tr], e[tr], pen)
    return _risk(model, z_te), float(np.median(_risk(model, z_tr))), k, pen


def _read_clinical(df, name, id_col, time, event):
    for col, arg in ((time, "time"), (event, "event")):
        if col not in df.columns:
            raise LabelError(
                f"clinical table {name} has no {arg} column {col!r}; columns are "
                f"{list(map(str, df.columns))[:10]}; pass {arg}= (--{arg}-col)."
            )
    import pandas as pd

    t = pd.to_numeric(df[time], errors="coerce")
    bad = t.isna()
    if bad.any():
        raise LabelError(
            f"clinical table {name} has NaN or non-numeric times in {time!r} for slides "
            f"{few(df.loc[bad, id_col].tolist())}; drop those rows or fill them in."
        )
    neg = t < 0
    if neg.any():
        raise LabelError(
            f"clinical table {name} has negative times in {time!r} for slides "
            f"{few(df.loc[neg, id_col].tolist())} (e.g. {float(t[neg].iloc[0])}); times are "
            "durations from diagnosis and must be >= 0."
        )
    raw = df[event]
    ev = pd.to_numeric(raw.map(lambda v: int(v) if isinstance(v, (bool, np.bool_)) else v),
                       errors="coerce")
    bad = ~ev.isin([0, 1])
    if bad.any():
        vals = sorted({str(v) for v in raw[bad].tolist()})
        raise LabelError(
            f"clinical table {name} has events not in {{0, 1}} in {event!r}: values {vals[:5]} "
            f"for slides {few(df.loc[bad, id_col].tolist())}; use 1 = event (death), 0 = censored."
        )
    return t.to_numpy(np.float64), ev.to_numpy().astype(np.int64)


@single_threaded
def survival(
    embeddings: EmbeddingsLike,
    clinical: TableLike,
    *,
    time: str = "time",
    event: str = "event",
    id_col: str = "slide_id",
    patient_col: str | None = "patient_id",
    folds: int = 5,
    penalizer: Literal["cv"] | float | Sequence[float] = "cv",
    n_components: int | Literal["auto"] = "auto",
    groups: Literal["patient"] | None = "patient",
    inner_folds: int = 3,
    n_bootstrap: int = 1000,
    seed: int = 0,
    embedding_id_col: str | None = None,
) -> SurvivalReport:
    """Out-of-fold Cox proportional-hazards models of survival from slide embeddings.

    Args:
        embeddings: :class:`~wsi_ssl.store.SlideEmbeddings`, a DataFrame indexed by slide id,
            or a ``.npz`` / ``.csv`` / ``.tsv`` / ``.parquet`` path.
        clinical: DataFrame or CSV/TSV/parquet path with ``id_col``, ``time`` (>= 0, any unit)
            and ``event`` (1 = event, 0 = censored) columns, optionally ``patient_col``.
        folds: outer CV folds (grouped by patient, stratified on the event).
        penalizer: L2 penalty of ``CoxPHFitter``: ``"cv"`` picks from :data:`PENALIZER_GRID` by
            inner CV (C-index) in each training fold, a list is a custom grid, a number is fixed.
        n_components: PCA components fitted inside each training fold; ``"auto"`` = one per ten
            training events, between 2 and 32 (and at most the embedding dimension).
        groups: ``"patient"`` keeps each patient's slides in one fold (``patient_col``, else the
            TCGA barcode prefix, else the slide id); ``None`` treats slides as independent.
        n_bootstrap: patient-level bootstrap resamples for the 95 % CI of the mean C-index.
        seed: seeds the folds, PCA and the bootstrap.

    Returns:
        A :class:`SurvivalReport` (``to_frame()``, ``to_json()``, ``plot()``, ``save(dir)``).

    Raises:
        LabelError: unknown/missing/duplicated ids, NaN or negative times, events not in
            {0, 1}, fewer events (patients with an event) than folds.
        ConfigError: a bad parameter value.
    """
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise ConfigError(f"folds={folds!r} must be an integer >= 2.")
    if not (n_components == "auto" or (isinstance(n_components, int) and n_components >= 1)):
        raise ConfigError(f"n_components={n_components!r} must be 'auto' or an integer >= 1.")
    if isinstance(penalizer, str) and penalizer != "cv":
        raise ConfigError(f"penalizer={penalizer!r} must be 'cv', a number >= 0 or a list.")
    if not isinstance(penalizer, str):
        grid = list(penalizer) if isinstance(penalizer, Sequence) else [penalizer]
        if not grid or any(not np.isfinite(float(p)) or float(p) < 0 for p in grid):
            raise ConfigError(f"penalizer={penalizer!r} must be 'cv', a number >= 0 or a list.")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap={n_bootstrap!r} must be an integer >= 0.")
    emb = as_embeddings(embeddings, id_col=embedding_id_col)
    df, name = read_table(clinical, id_col=id_col, what="clinical")
    t, e = _read_clinical(df, name, id_col, time, event)
    x = align(emb, df, id_col=id_col, name=name, what="clinical")
    grouped = groups is not None
    g = patient_ids(df, id_col=id_col, patient_col=patient_col, groups=groups)
    n_ev_units = len(np.unique(g[e == 1]))
    if n_ev_units < folds:
        unit = "patients with an event" if grouped else "events"
        raise LabelError(
            f"clinical table {name} has only {n_ev_units} {unit} in {event!r}, fewer than "
            f"folds={folds}; lower folds or add slides with events."
        )
    risk = np.zeros(len(t))
    high = np.zeros(len(t), bool)
    fold_of = np.full(len(t), -1, np.int64)
    fold_rows: list[SurvivalFold] = []
    rng = np.random.default_rng(seed)
    boot = np.zeros(max(n_bootstrap, 1))
    for f, (tr, te) in enumerate(_splits(folds, t, e, g, grouped, seed)):
        r_te, thr, k, pen = _fit_fold(x, t, e, g, tr, te, penalizer=penalizer,
                                      n_components=n_components, grouped=grouped,
                                      inner_folds=inner_folds, seed=seed + f)
        risk[te], high[te], fold_of[te] = r_te, r_te > thr, f
        c = float(cindex_weighted(t[te], e[te], r_te, np.ones((1, len(te))))[0])
        boot += cindex_weighted(t[te], e[te], r_te,
                                cluster_bootstrap_weights(g[te], len(boot), rng))
        fold_rows.append(SurvivalFold(fold=f, n_train=len(tr), n_test=len(te),
                                      n_events_test=int(e[te].sum()), n_components=k,
                                      penalizer=pen, c_index=c))
    cs = np.array([r.c_index for r in fold_rows])
    from lifelines.statistics import logrank_test

    if high.any() and (~high).any():
        p = float(logrank_test(t[high], t[~high], e[high], e[~high]).p_value)
    else:
        p = float("nan")
    ci = percentile_ci(boot / folds) if n_bootstrap else (float("nan"), float("nan"))
    config = {
        "time": time, "event": event, "id_col": id_col, "patient_col": patient_col,
        "folds": folds, "penalizer": penalizer if isinstance(penalizer, (str, int, float))
        else list(penalizer), "n_components": n_components, "groups": groups,
        "inner_folds": inner_folds, "n_bootstrap": n_bootstrap, "seed": seed,
        "embeddings": emb.provenance, "dim": emb.dim,
        "model": "StandardScaler + PCA (fit per fold) + lifelines CoxPHFitter(l1_ratio=0)",
    }
    report = SurvivalReport(
        c_index_mean=float(np.nanmean(cs)), c_index_std=float(np.nanstd(cs)), c_index_ci=ci,
        folds=tuple(fold_rows), logrank_p=p, slide_ids=tuple(df[id_col]),
        patients=tuple(str(v) for v in g), time=tuple(t.tolist()),
        event=tuple(int(v) for v in e), risk=tuple(risk.tolist()),
        high_risk=tuple(bool(h) for h in high), cv_fold=tuple(int(v) for v in fold_of),
        config=config,
    )
    logger.info("survival: C-index %.3f ± %.3f, log-rank p=%.3g", report.c_index_mean,
                report.c_index_std, p)
    return report
