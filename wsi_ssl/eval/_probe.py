"""Few-shot linear probes on slide embeddings, grouped by patient, with bootstrap intervals.

The probe is ``StandardScaler`` + ``LogisticRegression(class_weight="balanced")`` (scikit-learn).
Two protocols run in one call:

* **few-shot**: one fixed held-out side (a stratified, patient-grouped split of ``test_size``);
  for each ``n`` in ``n_labeled``, ``repeats`` stratified subsets of ``n`` slides are drawn from
  the training side, fitted, and scored on the held-out side;
* **k-fold CV** on every labelled slide (stratified, patient-grouped).

With ``C=10, groups=None`` the CV row is the Giga-SSL evaluation (see ``docs/eval.md``).
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
    Level,
    TableLike,
    align,
    as_embeddings,
    few,
    patient_ids,
    patient_level,
    read_table,
    single_threaded,
)
from wsi_ssl.eval._probe_report import ProbeReport, ProbeResult, RocCurve
from wsi_ssl.eval._stats import (
    balanced_accuracy_weighted,
    cluster_bootstrap_weights,
    macro_auc_weighted,
    percentile_ci,
)

__all__ = ["linear_probe", "C_GRID", "DEFAULT_C"]

logger = logging.getLogger(__name__)

#: Candidate C values of the inner cross-validation (``C="cv"``).
C_GRID: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: C used when a training set is too small for inner CV (a class with fewer than
#: ``inner_folds`` slides).
DEFAULT_C: float = 1.0
_FPR_GRID = np.linspace(0.0, 1.0, 101)


def _model(c: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter))


def _split(n_splits: int, grouped: bool, seed: int, x, y, g) -> list[tuple[np.ndarray, ...]]:
    """Stratified (and patient-grouped) shuffled k-fold splits."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if grouped:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(cv.split(x, y, g))
    return list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y))


def _choose_c(x, y, g, grid, inner_folds, grouped, seed, max_iter, n_classes) -> float:
    """The C of ``grid`` with the best mean inner-CV AUC (ties: the smallest C), chosen by
    scikit-learn's ``GridSearchCV`` on stratified (patient-grouped) inner folds; folds missing a
    class on either side are left out. :data:`DEFAULT_C` when a class has fewer than
    ``inner_folds`` slides (patients) or no inner fold has every class on both sides."""
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < inner_folds or (grouped and len(np.unique(g)) < inner_folds):
        return DEFAULT_C
    from sklearn.model_selection import GridSearchCV

    splits = [(tr, te) for tr, te in _split(inner_folds, grouped, seed, x, y, g)
              if len(np.unique(y[tr])) == n_classes and len(np.unique(y[te])) == n_classes]
    if not splits:
        return DEFAULT_C
    search = GridSearchCV(
        _model(DEFAULT_C, max_iter), {"logisticregression__C": sorted(float(c) for c in grid)},
        scoring="roc_auc" if n_classes == 2 else "roc_auc_ovr", cv=splits,
        refit=_smallest_of_the_best, error_score="raise")
    search.fit(x, y)
    return float(search.best_params_["logisticregression__C"])


def _smallest_of_the_best(results: dict) -> int:
    """``GridSearchCV(refit=)``: the first candidate (grid in ascending C) whose mean score is
    the best up to float round-off, i.e. the smallest C among ties (AUCs on small inner folds
    tie often)."""
    mean = np.asarray(results["mean_test_score"])
    return int(np.flatnonzero(mean >= mean.max() - 1e-12)[0])


def _fit_predict(x, y, g, tr, te, *, C, inner_folds, grouped, seed, max_iter, n_classes):
    if isinstance(C, str):
        grid = C_GRID
    elif isinstance(C, Sequence):
        grid = tuple(float(c) for c in C)
    else:
        grid = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge.*|.*lbfgs failed.*")
        c = (_choose_c(x[tr], y[tr], g[tr], grid, inner_folds, grouped, seed, max_iter,
                       n_classes) if grid is not None else float(C))
        proba = _model(c, max_iter).fit(x[tr], y[tr]).predict_proba(x[te])
    return proba, c


def _stratified_subset(idx: np.ndarray, y: np.ndarray, m: int,
                       rng: np.random.Generator) -> np.ndarray:
    """``m`` indices of ``idx`` with class proportions kept (largest remainder) and at least
    one slide of every class."""
    classes, counts = np.unique(y[idx], return_counts=True)
    share = m * counts / counts.sum()
    alloc = np.minimum(np.maximum(1, np.floor(share)).astype(int), counts)
    while alloc.sum() < m:
        room = np.where(alloc < counts, share - alloc, -np.inf)
        alloc[int(np.argmax(room))] += 1
    while alloc.sum() > m:
        alloc[int(np.argmax(np.where(alloc > 1, alloc - share, -np.inf)))] -= 1
    picks = [rng.choice(idx[y[idx] == c], a, replace=False) for c, a in zip(classes, alloc, strict=True)]
    return np.sort(np.concatenate(picks))


def _mean_roc(name: str, runs: list[tuple[np.ndarray, np.ndarray]], n_classes: int,
              auc: float) -> RocCurve:
    from sklearn.metrics import roc_curve

    curves = []
    for y, proba in runs:
        cols = [1] if n_classes == 2 else range(n_classes)
        per = []
        for k in cols:
            fpr, tpr, _ = roc_curve(y == k, proba[:, k])
            per.append(np.interp(_FPR_GRID, fpr, tpr))
        curves.append(np.mean(per, axis=0))
    tpr = np.mean(curves, axis=0)
    tpr[0] = 0.0
    return RocCurve(name, tuple(_FPR_GRID.tolist()), tuple(tpr.tolist()), float(auc))


def _summarise(setting, n_labeled, requested, blocks, n_classes, n_bootstrap, rng, shared):
    """Turn runs ``[(test_idx, y_test, proba, groups_test, C)]`` into a :class:`ProbeResult`.

    ``shared=True`` (few-shot): every run has the same test side, so one bootstrap resample of
    its patients scores every run; else (CV) each fold's patients are resampled on their own.
    The CI is the percentile interval of the mean over runs.
    """
    ones = [np.ones((1, len(b[1]))) for b in blocks]
    auc_runs = [float(macro_auc_weighted(b[1], b[2], o)[0]) for b, o in zip(blocks, ones, strict=True)]
    bacc_runs = [float(balanced_accuracy_weighted(b[1], b[2].argmax(1), n_classes, o)[0])
                 for b, o in zip(blocks, ones, strict=True)]
    boot_auc = np.zeros(n_bootstrap)
    boot_bacc = np.zeros(n_bootstrap)
    w = cluster_bootstrap_weights(blocks[0][3], n_bootstrap, rng) if shared else None
    for b in blocks:
        wb = w if shared else cluster_bootstrap_weights(b[3], n_bootstrap, rng)
        boot_auc += macro_auc_weighted(b[1], b[2], wb)
        boot_bacc += balanced_accuracy_weighted(b[1], b[2].argmax(1), n_classes, wb)
    k = len(blocks)
    return ProbeResult(
        setting=setting, n_labeled=float(n_labeled), requested=requested, runs=k,
        auc_mean=float(np.mean(auc_runs)), auc_std=float(np.std(auc_runs)),
        auc_ci=percentile_ci(boot_auc / k),
        bacc_mean=float(np.mean(bacc_runs)), bacc_std=float(np.std(bacc_runs)),
        bacc_ci=percentile_ci(boot_bacc / k),
        auc_runs=tuple(auc_runs), bacc_runs=tuple(bacc_runs), C=tuple(b[4] for b in blocks),
    )


def _check_config(n_labeled, repeats, test_size, folds, C, n_bootstrap, inner_folds) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r} must be an integer >= 1.")
    if not 0.0 < float(test_size) < 1.0:
        raise ConfigError(f"test_size={test_size!r} must be a fraction in (0, 1), e.g. 0.25.")
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise ConfigError(f"folds={folds!r} must be an integer >= 2, or None for no CV.")
    if not n_labeled and folds is None:
        raise ConfigError("n_labeled=() and folds=None leave nothing to evaluate; pass one.")
    if isinstance(C, str):
        if C != "cv":
            raise ConfigError(f"C={C!r} must be 'cv', a positive number or a list of them.")
    else:
        grid = list(C) if isinstance(C, Sequence) else [C]
        if not grid or any(not np.isfinite(float(c)) or float(c) <= 0 for c in grid):
            raise ConfigError(f"C={C!r} must be 'cv', a positive number or a list of them.")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 0:
        raise ConfigError(f"n_bootstrap={n_bootstrap!r} must be an integer >= 0.")
    if not isinstance(inner_folds, int) or inner_folds < 2:
        raise ConfigError(f"inner_folds={inner_folds!r} must be an integer >= 2.")


def _check_class_sizes(y, g, classes, need, why, grouped, name, label_col) -> None:
    for k, c in enumerate(classes):
        members = y == k
        n_slides = int(members.sum())
        n_pat = len(np.unique(g[members]))
        count, unit = (n_pat, "patients") if grouped else (n_slides, "slides")
        if count < need:
            raise LabelError(
                f"class {c!r} of column {label_col!r} in {name} has only {count} {unit}; {why} "
                f"needs at least {need}; lower it, merge rare classes, or add labelled slides."
            )


@single_threaded
def linear_probe(
    embeddings: EmbeddingsLike,
    labels: TableLike,
    *,
    label_col: str = "label",
    id_col: str = "slide_id",
    patient_col: str | None = "patient_id",
    n_labeled: Sequence[int | None] = (25, 50, 100, None),
    repeats: int = 10,
    test_size: float = 0.25,
    folds: int | None = 5,
    groups: Literal["patient"] | None = "patient",
    C: Literal["cv"] | float | Sequence[float] = "cv",
    inner_folds: int = 3,
    n_bootstrap: int = 1000,
    max_iter: int = 1000,
    seed: int = 0,
    embedding_id_col: str | None = None,
    level: Level = "slide",
    feature_cols: Sequence[str] | None = None,
) -> ProbeReport:
    """Few-shot and k-fold linear probes of slide embeddings against slide labels.

    Args:
        embeddings: :class:`~wsi_ssl.store.SlideEmbeddings`, a DataFrame indexed by slide id,
            or a path to ``.npz`` / ``.csv`` / ``.tsv`` / ``.parquet`` (ids in the first column or
            ``embedding_id_col``).
        labels: DataFrame or CSV/TSV/parquet path with ``id_col`` and ``label_col`` (and
            optionally ``patient_col``). Rows are used in table order.
        n_labeled: few-shot training sizes; ``None`` = the whole training side. Sizes above the
            training side are clamped to it with a warning (and skipped if that repeats one).
            ``()`` runs the CV only.
        repeats: random subsets per few-shot size (the whole training side runs once).
        test_size: fraction of patients on the fixed held-out side. With ``groups="patient"``
            the split is the first fold of a ``StratifiedGroupKFold`` with
            ``round(1 / test_size)`` folds, so the fraction is approximate.
        folds: k of the k-fold CV on every slide; ``None`` skips it.
        groups: ``"patient"``: no patient on both sides of any split (``patient_col`` when the
            table has it, else the TCGA barcode prefix ``TCGA-XX-XXXX``, else the slide id);
            ``None``: slides are independent (plain ``StratifiedKFold``).
        C: ``"cv"`` picks C from :data:`C_GRID` by inner CV on each training set (AUC), a list
            is a custom grid, a number is used as is. Too small a training set for inner CV
            (a class with fewer than ``inner_folds`` slides) uses :data:`DEFAULT_C`.
        n_bootstrap: patient-level bootstrap resamples of the held-out side for the 95 % CIs
            (0 = no CI).
        seed: seeds the splits, the subsets and the bootstrap.
        embedding_id_col: id column of a CSV/parquet embedding table (default: its first).
        level: ``"slide"``: one row per slide (splits keep a patient's slides together);
            ``"patient"``: one row per patient, the mean of its slide embeddings (its slides
            must share the label). The report states the level, slides and patients.
        feature_cols: the feature columns of a CSV/parquet/DataFrame embedding table (default:
            every numeric column but the id). The label and patient columns are refused.

    Returns:
        A :class:`ProbeReport` (``to_frame()``, ``to_json()``, ``plot()``, ``save(dir)``).

    Raises:
        LabelError: unknown/missing/duplicated ids, NaN labels, a single class, or a class with
            fewer slides (patients) than the folds need.
        ConfigError: a bad parameter value.
    """
    _check_config(n_labeled, repeats, test_size, folds, C, n_bootstrap, inner_folds)
    import pandas as pd

    if level not in ("slide", "patient"):
        raise ConfigError(f"level={level!r} must be 'slide' or 'patient'.")
    reserved = {c: role for c, role in ((label_col, "label"), (patient_col, "patient")) if c}
    emb = as_embeddings(embeddings, id_col=embedding_id_col, feature_cols=feature_cols,
                        reserved=reserved)
    df, name = read_table(labels, id_col=id_col, what="labels")
    if label_col not in df.columns:
        raise LabelError(
            f"labels table {name} has no label column {label_col!r}; columns are "
            f"{list(map(str, df.columns))[:10]}; pass label_col= (--label-col)."
        )
    nan = df[label_col].isna()
    if nan.any():
        raise LabelError(
            f"labels table {name} has NaN in {label_col!r} for slides "
            f"{few(df.loc[nan, id_col].tolist())}; drop those rows or fill them in."
        )
    x = align(emb, df, id_col=id_col, name=name, what="labels")
    g = patient_ids(df, id_col=id_col, patient_col=patient_col,
                    groups="patient" if level == "patient" else groups)
    row_ids, label_values = df[id_col].to_numpy(dtype=object), df[label_col].to_numpy()
    n_input, n_input_patients = len(row_ids), len(np.unique(g.astype(str)))
    if level == "patient":
        x, g, out, _ = patient_level(x, g, {label_col: label_values}, name=name, id_col=id_col)
        row_ids, label_values = g, out[label_col]
    codes, uniques = pd.factorize(pd.Series(label_values), sort=True)
    y = codes.astype(np.int64)
    classes = tuple(str(u) for u in uniques)
    if len(classes) < 2:
        raise LabelError(
            f"column {label_col!r} of {name} has a single class {classes!r}; a probe needs two."
        )
    n_classes = len(classes)
    grouped = groups is not None or level == "patient"
    rng = np.random.default_rng(seed)
    fit = dict(C=C, inner_folds=inner_folds, grouped=grouped, max_iter=max_iter,
               n_classes=n_classes)
    n_boot = max(n_bootstrap, 1)
    results: list[ProbeResult] = []
    roc: list[RocCurve] = []
    n = len(y)
    heldout = np.zeros(n, bool)

    if n_labeled:
        holdout_splits = max(2, int(round(1.0 / float(test_size))))
        _check_class_sizes(y, g, classes, 2, "the held-out split (one per side)", grouped,
                           name, label_col)
        if grouped:
            tr, te = _split(holdout_splits, True, seed, x, y, g)[0]
        else:
            from sklearn.model_selection import train_test_split

            tr, te = train_test_split(np.arange(n), test_size=float(test_size), stratify=y,
                                      random_state=seed)
            tr, te = np.sort(tr), np.sort(te)
        missing = [classes[k] for k in range(n_classes)
                   if not (y[tr] == k).any() or not (y[te] == k).any()]
        if missing:
            raise LabelError(
                f"classes {missing} of {name} could not be put on both sides of the held-out "
                "split (too few patients); add slides or use a larger test_size."
            )
        heldout[te] = True
        sizes: list[tuple[int, int | None]] = []
        for req in n_labeled:
            if req is None:
                m = len(tr)
            else:
                if isinstance(req, bool) or int(req) != req or req < n_classes:
                    raise ConfigError(
                        f"n_labeled entry {req!r} must be an integer >= the number of classes "
                        f"({n_classes}), or None for the whole training side."
                    )
                m = int(req)
                if m > len(tr):
                    warnings.warn(
                        f"n_labeled={m} is larger than the training side ({len(tr)} slides); "
                        f"clamped to {len(tr)}.", UserWarning, stacklevel=3)
                    m = len(tr)
            if any(m == s[0] for s in sizes):
                warnings.warn(f"n_labeled={req!r} repeats size {m}; skipped.", UserWarning,
                              stacklevel=3)
                continue
            sizes.append((m, None if m == len(tr) else int(req)))
        for m, req in sorted(sizes):
            blocks = []
            runs = 1 if m == len(tr) else repeats
            for r in range(runs):
                sub = tr if m == len(tr) else _stratified_subset(tr, y, m, rng)
                proba, c = _fit_predict(x, y, g, sub, te, seed=seed + r, **fit)
                blocks.append((te, y[te], proba, g[te], c))
            res = _summarise("few-shot", m, req, blocks, n_classes, n_boot, rng, shared=True)
            results.append(res)
            roc.append(_mean_roc(res.name, [(b[1], b[2]) for b in blocks], n_classes,
                                 res.auc_mean))

    cv_fold = np.full(n, -1, np.int64)
    cv_proba = np.zeros((0, n_classes))
    if folds is not None:
        _check_class_sizes(y, g, classes, folds, f"folds={folds}", grouped, name, label_col)
        cv_proba = np.zeros((n, n_classes))
        blocks = []
        sizes_tr = []
        for f, (tr, te) in enumerate(_split(folds, grouped, seed, x, y, g)):
            absent = [classes[k] for k in range(n_classes) if not (y[te] == k).any()]
            if absent:
                raise LabelError(
                    f"CV fold {f} of {name} has no slide of classes {absent} (too few patients "
                    f"per class for folds={folds}); use fewer folds."
                )
            proba, c = _fit_predict(x, y, g, tr, te, seed=seed + f, **fit)
            cv_proba[te] = proba
            cv_fold[te] = f
            sizes_tr.append(len(tr))
            blocks.append((te, y[te], proba, g[te], c))
        res = _summarise("cv", float(np.mean(sizes_tr)), None, blocks, n_classes, n_boot, rng,
                         shared=False)
        results.append(res)
        roc.append(_mean_roc(res.name, [(b[1], b[2]) for b in blocks], n_classes, res.auc_mean))
    if n_bootstrap == 0:
        results = [_drop_ci(r) for r in results]

    config = {
        "label_col": label_col, "id_col": id_col, "patient_col": patient_col,
        "n_labeled": list(n_labeled), "repeats": repeats, "test_size": float(test_size),
        "folds": folds, "groups": groups, "C": C if isinstance(C, (str, int, float)) else list(C),
        "inner_folds": inner_folds, "n_bootstrap": n_bootstrap, "max_iter": max_iter,
        "seed": seed, "embeddings": emb.provenance, "dim": emb.dim, "level": level,
        "n_slides": n_input, "n_patients": n_input_patients,
        "model": "StandardScaler + LogisticRegression(class_weight='balanced', lbfgs)",
    }
    report = ProbeReport(
        task="binary" if n_classes == 2 else "multiclass", classes=classes,
        results=tuple(results), roc=tuple(roc), slide_ids=tuple(str(s) for s in row_ids),
        patients=tuple(str(p) for p in g), labels=tuple(str(v) for v in label_values),
        heldout=tuple(bool(h) for h in heldout), cv_fold=tuple(int(f) for f in cv_fold),
        cv_proba=cv_proba, level=level, n_input_slides=n_input, config=config,
    )
    for r in report.results:
        logger.info("probe %s: AUC %.3f ± %.3f (95%% CI %.3f-%.3f)", r.name, r.auc_mean,
                    r.auc_std, *r.auc_ci)
    return report


def _drop_ci(r: ProbeResult) -> ProbeResult:
    from dataclasses import replace

    nan = (float("nan"), float("nan"))
    return replace(r, auc_ci=nan, bacc_ci=nan)
