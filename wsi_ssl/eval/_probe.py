"""Few-shot linear probes on slide embeddings, grouped by patient, with intervals that account
for the split and the fit.

The probe is ``StandardScaler`` + ``LogisticRegression(class_weight="balanced")`` (scikit-learn).
Two protocols run in one call:

* **few-shot**: ``repeats`` random stratified, patient-grouped held-out splits of ``test_size``;
  on each, for each ``n`` in ``n_labeled``, a stratified subset of ``n`` slides is drawn from the
  training side, fitted, and scored on that split's held-out side;
* **repeated k-fold CV** on every labelled slide (stratified, patient-grouped, ``cv_repeats``
  times with different shuffles).

Every 95 % interval comes from a bootstrap that refits: ``n_bootstrap`` resamples of patients,
on each of which one run of the protocol (split, C search, fit) is redone
(:func:`wsi_ssl.eval._stats.refit_interval`).

With ``C=10, groups=None`` the CV row is the Giga-SSL evaluation (see ``docs/eval.md``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
    INTERVAL_METHOD,
    MIN_BOOTSTRAP,
    balanced_accuracy_weighted,
    bootstrap_rows,
    group_folds,
    macro_auc_weighted,
    refit_interval,
    repeat_seed,
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
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn on first use
    from sklearn.pipeline import make_pipeline  # lazy: scikit-learn on first use
    from sklearn.preprocessing import StandardScaler  # lazy: scikit-learn on first use

    return make_pipeline(StandardScaler(),
                         LogisticRegression(C=c, class_weight="balanced", max_iter=max_iter))


def _split(n_splits: int, grouped: bool, seed: int, x, y, g) -> list[tuple[np.ndarray, ...]]:
    """Stratified (and patient-grouped) shuffled k-fold splits."""
    from sklearn.model_selection import (  # lazy: scikit-learn loads on the first fit, not on import
        StratifiedGroupKFold,
        StratifiedKFold,
    )

    if grouped:
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(cv.split(x, y, g))
    return list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y))


def _choose_c(x, y, g, grid, inner_folds, grouped, seed, max_iter, n_classes
              ) -> tuple[float, Any]:
    """The C of ``grid`` with the best mean inner-CV AUC (ties: the smallest C), chosen by
    scikit-learn's ``GridSearchCV`` on stratified (patient-grouped) inner folds; folds missing a
    class on either side are left out. :data:`DEFAULT_C` when a class has fewer than
    ``inner_folds`` slides (patients) or no inner fold has every class on both sides.

    Also returns the model with that C that the search refitted on all of ``x`` (the same fit
    as ``_model(C).fit(x, y)``, so it is not done twice), or None when there was no search."""
    counts = np.bincount(y, minlength=n_classes)
    if counts.min() < inner_folds or (grouped and len(np.unique(g)) < inner_folds):
        return DEFAULT_C, None
    from sklearn.model_selection import GridSearchCV  # lazy: scikit-learn on first use

    splits = [(tr, te) for tr, te in _split(inner_folds, grouped, seed, x, y, g)
              if len(np.unique(y[tr])) == n_classes and len(np.unique(y[te])) == n_classes]
    if not splits:
        return DEFAULT_C, None
    search = GridSearchCV(
        _model(DEFAULT_C, max_iter), {"logisticregression__C": sorted(float(c) for c in grid)},
        scoring="roc_auc" if n_classes == 2 else "roc_auc_ovr", cv=splits,
        refit=_smallest_of_the_best, error_score="raise")
    search.fit(x, y)
    return float(search.best_params_["logisticregression__C"]), search.best_estimator_


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
        c, model = (_choose_c(x[tr], y[tr], g[tr], grid, inner_folds, grouped, seed, max_iter,
                              n_classes) if grid is not None else (float(C), None))
        if model is None:
            model = _model(c, max_iter).fit(x[tr], y[tr])
        proba = model.predict_proba(x[te])
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
    from sklearn.metrics import roc_curve  # lazy: scikit-learn on first use

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


def _scores(blocks, n_classes) -> tuple[list[float], list[float]]:
    """AUC and balanced accuracy of each block ``(test_idx, y_test, proba, groups_test, C)``."""
    auc = [float(macro_auc_weighted(b[1], b[2], np.ones((1, len(b[1]))))[0]) for b in blocks]
    bacc = [float(balanced_accuracy_weighted(b[1], b[2].argmax(1), n_classes,
                                             np.ones((1, len(b[1]))))[0]) for b in blocks]
    return auc, bacc


def _summarise(setting, n_labeled, requested, blocks, n_classes, repeats, boot):
    """Turn runs ``[(test_idx, y_test, proba, groups_test, C)]`` into a :class:`ProbeResult`.

    Few-shot: one block per run (split); CV: ``folds`` blocks per repeat, a run being one
    repeat (the mean of its folds). ``boot`` is ``(B, 2)``: AUC and balanced accuracy of the one
    run refitted on each bootstrap resample (NaN where it failed)."""
    auc_blocks, bacc_blocks = _scores(blocks, n_classes)
    per = len(blocks) // repeats
    auc_run = np.nanmean(np.reshape(auc_blocks, (repeats, per)), axis=1)
    bacc_run = np.nanmean(np.reshape(bacc_blocks, (repeats, per)), axis=1)
    boot = np.asarray(boot, np.float64).reshape(-1, 2)
    auc = refit_interval(auc_run, boot[:, 0], null=0.5, bounds=(0.0, 1.0))
    bacc = refit_interval(bacc_run, boot[:, 1], null=1.0 / n_classes, bounds=(0.0, 1.0))
    return ProbeResult(
        setting=setting, n_labeled=float(n_labeled), requested=requested, runs=len(blocks),
        auc_mean=float(np.nanmean(auc_blocks)), auc_std=float(np.nanstd(auc_blocks)),
        auc_ci=auc.interval,
        bacc_mean=float(np.nanmean(bacc_blocks)), bacc_std=float(np.nanstd(bacc_blocks)),
        bacc_ci=bacc.interval,
        auc_runs=tuple(auc_blocks), bacc_runs=tuple(bacc_blocks), C=tuple(b[4] for b in blocks),
        auc_p_value=auc.p_value, repeats=repeats,
        auc_boot=tuple(float(v) for v in boot[:, 0]),
        bacc_boot=tuple(float(v) for v in boot[:, 1]),
    )


def _holdout(n_splits, grouped, seed, x, y, g, test_size):
    """One stratified (patient-grouped) held-out split: ``(train_idx, test_idx)``."""
    if grouped:
        return _split(n_splits, True, seed, x, y, g)[0]
    from sklearn.model_selection import train_test_split  # lazy: scikit-learn on first use

    tr, te = train_test_split(np.arange(len(y)), test_size=float(test_size), stratify=y,
                              random_state=seed)
    return np.sort(tr), np.sort(te)


def _boot_run(fn, *args) -> tuple[float, float]:
    """One refitted run on a bootstrap resample; ``(nan, nan)`` when the resample cannot be
    split or fitted (e.g. a class missing from a training side)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args)
    except (ValueError, IndexError, LabelError):
        return (float("nan"), float("nan"))


def _refit_config(fit: dict, blocks) -> dict:
    """The fit settings of the bootstrap runs: C fixed to the median C of the real runs (the
    inner search is not repeated on every resample; that would multiply the cost by ~19)."""
    return {**fit, "C": float(np.median([b[4] for b in blocks])), "grouped": True}


def _all_classes(y, n_classes) -> None:
    if len(np.unique(y)) < n_classes:
        raise ValueError("a bootstrap training side lacks a class")


def _few_shot_once(x, y, g, m, holdout_splits, seed, rng, fit, n_classes):
    """One few-shot run on a bootstrap resample: a patient-grouped held-out split, a stratified
    subset of ``m`` slides (``None``: the whole training side), AUC and balanced accuracy."""
    tr, te = group_folds(y, g, holdout_splits, seed)[0]
    sub = tr if m is None else _stratified_subset(tr, y, min(m, len(tr)), rng)
    _all_classes(y[sub], n_classes)
    proba, _ = _fit_predict(x, y, g, sub, te, seed=seed, **fit)
    auc, bacc = _scores([(te, y[te], proba, g[te], 0.0)], n_classes)
    return auc[0], bacc[0]


def _cv_once(x, y, g, folds, seed, fit, n_classes):
    """One patient-grouped k-fold CV on a bootstrap resample: mean AUC and balanced accuracy
    over the folds."""
    blocks = []
    for f, (tr, te) in enumerate(group_folds(y, g, folds, seed)):
        _all_classes(y[tr], n_classes)
        proba, _ = _fit_predict(x, y, g, tr, te, seed=seed + f, **fit)
        blocks.append((te, y[te], proba, g[te], 0.0))
    auc, bacc = _scores(blocks, n_classes)
    return float(np.nanmean(auc)), float(np.nanmean(bacc))


def _check_config(n_labeled, repeats, test_size, folds, C, cv_repeats, inner_folds,
                  n_bootstrap) -> None:
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats={repeats!r} must be an integer >= 1 (2 or more for an "
                          "interval).")
    if isinstance(cv_repeats, bool) or not isinstance(cv_repeats, int) or cv_repeats < 1:
        raise ConfigError(f"cv_repeats={cv_repeats!r} must be an integer >= 1.")
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
    if not isinstance(inner_folds, int) or inner_folds < 2:
        raise ConfigError(f"inner_folds={inner_folds!r} must be an integer >= 2.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or (
            n_bootstrap != 0 and n_bootstrap < MIN_BOOTSTRAP):
        raise ConfigError(f"n_bootstrap={n_bootstrap!r} must be 0 (no interval) or an integer "
                          f">= {MIN_BOOTSTRAP}.")


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
    n_bootstrap: int = 50,
    max_iter: int = 1000,
    seed: int = 0,
    embedding_id_col: str | None = None,
    level: Level = "slide",
    feature_cols: Sequence[str] | None = None,
    cv_repeats: int = 1,
) -> ProbeReport:
    """Few-shot and repeated k-fold linear probes of slide embeddings against slide labels.

    Every 95 % interval comes from a patient bootstrap that refits the whole protocol on each
    resample (``docs/eval.md``).

    Args:
        embeddings: :class:`~wsi_ssl.store.SlideEmbeddings`, a DataFrame indexed by slide id,
            or a path to ``.npz`` / ``.csv`` / ``.tsv`` / ``.parquet`` (ids in the first column or
            ``embedding_id_col``).
        labels: DataFrame or CSV/TSV/parquet path with ``id_col`` and ``label_col`` (and
            optionally ``patient_col``). Rows are used in table order.
        n_labeled: few-shot training sizes; ``None`` = the whole training side. Sizes above the
            smallest training side are clamped to it with a warning (and skipped if that repeats
            one). ``()`` runs the CV only.
        repeats: random held-out splits, each with a freshly drawn labelled subset per few-shot
            size (the whole training side too); the interval needs at least 2.
        test_size: fraction of patients on the held-out side of each split. With
            ``groups="patient"`` the split is the first fold of a ``StratifiedGroupKFold`` with
            ``round(1 / test_size)`` folds, so the fraction is approximate.
        folds: k of the k-fold CV on every slide; ``None`` skips it.
        cv_repeats: repeats of the k-fold CV with different shuffles (the first uses ``seed``
            itself, as a single k-fold CV would).
        groups: ``"patient"``: no patient on both sides of any split (``patient_col`` when the
            table has it, else the TCGA barcode prefix ``TCGA-XX-XXXX``, else the slide id);
            ``None``: slides are independent (plain ``StratifiedKFold``).
        C: ``"cv"`` picks C from :data:`C_GRID` by inner CV on each training set (AUC), a list
            is a custom grid, a number is used as is. Too small a training set for inner CV
            (a class with fewer than ``inner_folds`` slides) uses :data:`DEFAULT_C`.
        n_bootstrap: resamples of patients (within each class) on each of which one run of
            every setting (split, subset, fit; C fixed to the median C of the real runs) is
            redone for the 95 % intervals; 0 = no interval (much faster).
        seed: seeds the splits, the subsets and the resamples.
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
    _check_config(n_labeled, repeats, test_size, folds, C, cv_repeats, inner_folds,
                  n_bootstrap)
    if level not in ("slide", "patient"):
        raise ConfigError(f"level={level!r} must be 'slide' or 'patient'.")
    d = _probe_data(embeddings, labels, label_col=label_col, id_col=id_col,
                    patient_col=patient_col, groups=groups, embedding_id_col=embedding_id_col,
                    level=level, feature_cols=feature_cols)
    grouped = groups is not None or level == "patient"
    rng = np.random.default_rng(seed)
    fit = dict(C=C, inner_folds=inner_folds, grouped=grouped, max_iter=max_iter,
               n_classes=d.n_classes)
    # the bootstrap: resamples of patients within each class (copies keep their patient id, so
    # every split keeps them together), one refitted run of each setting on each
    brng = np.random.default_rng([seed, 1])
    boot = _Bootstrap(rows=bootstrap_rows(d.g, d.y, n_bootstrap, brng), rng=brng,
                      seeds=[repeat_seed(seed, 1000 + b) for b in range(n_bootstrap)])
    few_shot = _FewShot(results=[], roc=[], heldout=np.zeros(len(d.y), bool), heldout_runs=[])
    if n_labeled:
        few_shot = _few_shot(d, n_labeled, repeats, test_size, grouped, seed, rng, fit, boot)
    cv = _CrossValidation(results=[], roc=[], fold=np.full(len(d.y), -1, np.int64), fold_runs=[],
                          proba=np.zeros((0, d.n_classes)))
    if folds is not None:
        cv = _cross_validation(d, folds, cv_repeats, grouped, seed, fit, boot)
    config = {
        "label_col": label_col, "id_col": id_col, "patient_col": patient_col,
        "n_labeled": list(n_labeled), "repeats": repeats, "test_size": float(test_size),
        "folds": folds, "cv_repeats": cv_repeats, "groups": groups,
        "C": C if isinstance(C, (str, int, float)) else list(C),
        "inner_folds": inner_folds, "n_bootstrap": n_bootstrap, "interval": INTERVAL_METHOD,
        "max_iter": max_iter,
        "seed": seed, "embeddings": d.emb.provenance, "dim": d.emb.dim, "level": level,
        "n_slides": d.n_input, "n_patients": d.n_input_patients,
        "model": "StandardScaler + LogisticRegression(class_weight='balanced', lbfgs)",
    }
    return _report(d, few_shot, cv, level, config)


@dataclass
class _ProbeData:
    """The aligned inputs of a probe: features ``x``, class codes ``y``, patient ids ``g``."""

    emb: Any
    name: str
    label_col: str
    x: np.ndarray
    y: np.ndarray
    g: np.ndarray
    classes: tuple[str, ...]
    row_ids: np.ndarray
    label_values: np.ndarray
    n_input: int
    n_input_patients: int

    @property
    def n_classes(self) -> int:
        return len(self.classes)


@dataclass
class _Bootstrap:
    """The patient resamples (row indices), their generator and one seed per resample."""

    rows: list[np.ndarray]
    rng: np.random.Generator
    seeds: list[int]


@dataclass
class _FewShot:
    results: list[ProbeResult]
    roc: list[RocCurve]
    heldout: np.ndarray
    heldout_runs: list[list[int]]


@dataclass
class _CrossValidation:
    results: list[ProbeResult]
    roc: list[RocCurve]
    fold: np.ndarray
    fold_runs: list[list[int]]
    proba: np.ndarray


def _probe_data(embeddings, labels, *, label_col, id_col, patient_col, groups,
                embedding_id_col, level, feature_cols) -> _ProbeData:
    """Read the embeddings and the labels, align them (per patient for ``level="patient"``)
    and code the labels as classes."""
    import pandas as pd  # lazy: keeps `import wsi_ssl.eval` light

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
    classes = tuple(str(u) for u in uniques)
    if len(classes) < 2:
        raise LabelError(
            f"column {label_col!r} of {name} has a single class {classes!r}; a probe needs two."
        )
    return _ProbeData(emb=emb, name=name, label_col=label_col, x=x, y=codes.astype(np.int64),
                      g=g, classes=classes, row_ids=row_ids, label_values=label_values,
                      n_input=n_input, n_input_patients=n_input_patients)


def _heldout_splits(d: _ProbeData, repeats, holdout_splits, grouped, seed, test_size
                    ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``repeats`` held-out splits, each with every class on both sides."""
    _check_class_sizes(d.y, d.g, d.classes, 2, "the held-out split (one per side)", grouped,
                       d.name, d.label_col)
    splits = []
    for r in range(repeats):
        tr, te = _holdout(holdout_splits, grouped, repeat_seed(seed, r), d.x, d.y, d.g,
                          test_size)
        missing = [d.classes[k] for k in range(d.n_classes)
                   if not (d.y[tr] == k).any() or not (d.y[te] == k).any()]
        if missing:
            raise LabelError(
                f"classes {missing} of {d.name} could not be put on both sides of the held-out "
                "split (too few patients); add slides or use a larger test_size."
            )
        splits.append((tr, te))
    return splits


def _few_shot_sizes(n_labeled, n_train: int, n_classes: int) -> list[tuple[int, int | None]]:
    """``(m, requested)`` of each few-shot size, clamped to the smallest training side
    ``n_train`` (``requested`` None: the whole training side), repeats skipped, sorted."""
    sizes: list[tuple[int, int | None]] = []
    for req in n_labeled:
        if req is None:
            m = n_train
        else:
            if isinstance(req, bool) or int(req) != req or req < n_classes:
                raise ConfigError(
                    f"n_labeled entry {req!r} must be an integer >= the number of classes "
                    f"({n_classes}), or None for the whole training side."
                )
            m = int(req)
            if m > n_train:
                warnings.warn(
                    f"n_labeled={m} is larger than the training side ({n_train} slides); "
                    f"clamped to {n_train}.", UserWarning, stacklevel=5)
                m = n_train
        if any(m == s[0] for s in sizes):
            warnings.warn(f"n_labeled={req!r} repeats size {m}; skipped.", UserWarning,
                          stacklevel=5)
            continue
        sizes.append((m, None if m == n_train else int(req)))
    return sorted(sizes)


def _few_shot(d: _ProbeData, n_labeled, repeats, test_size, grouped, seed, rng, fit,
              boot: _Bootstrap) -> _FewShot:
    """The few-shot protocol: held-out splits, one result (and mean ROC) per size."""
    holdout_splits = max(2, int(round(1.0 / float(test_size))))
    splits = _heldout_splits(d, repeats, holdout_splits, grouped, seed, test_size)
    heldout = np.zeros(len(d.y), bool)
    heldout[splits[0][1]] = True
    out = _FewShot(results=[], roc=[], heldout=heldout,
                   heldout_runs=[[int(i) for i in te] for _, te in splits])
    n_train = min(len(tr) for tr, _ in splits)  # the smallest training side of the splits
    for m, req in _few_shot_sizes(n_labeled, n_train, d.n_classes):
        blocks = []
        used = []
        for r, (tr, te) in enumerate(splits):
            sub = tr if req is None else _stratified_subset(tr, d.y, m, rng)
            proba, c = _fit_predict(d.x, d.y, d.g, sub, te, seed=seed + r, **fit)
            blocks.append((te, d.y[te], proba, d.g[te], c))
            used.append(len(sub))
        refit = _refit_config(fit, blocks)
        size = m if req is not None else None
        scores = [_boot_run(_few_shot_once, d.x[rows], d.y[rows], d.g[rows], size,
                            holdout_splits, boot.seeds[b], boot.rng, refit, d.n_classes)
                  for b, rows in enumerate(boot.rows)]
        res = _summarise("few-shot", float(np.mean(used)), req, blocks, d.n_classes,
                         len(blocks), scores)
        out.results.append(res)
        out.roc.append(_mean_roc(res.name, [(b[1], b[2]) for b in blocks], d.n_classes,
                                 res.auc_mean))
    return out


def _cross_validation(d: _ProbeData, folds: int, cv_repeats: int, grouped, seed, fit,
                      boot: _Bootstrap) -> _CrossValidation:
    """The repeated k-fold CV: one result, out-of-fold probabilities of the first repeat."""
    n = len(d.y)
    _check_class_sizes(d.y, d.g, d.classes, folds, f"folds={folds}", grouped, d.name,
                       d.label_col)
    out = _CrossValidation(results=[], roc=[], fold=np.full(n, -1, np.int64), fold_runs=[],
                           proba=np.zeros((n, d.n_classes)))
    blocks, sizes_tr = [], []
    for r in range(cv_repeats):
        s = repeat_seed(seed, r)
        assignment = np.full(n, -1, np.int64)
        for f, (tr, te) in enumerate(_split(folds, grouped, s, d.x, d.y, d.g)):
            absent = [d.classes[k] for k in range(d.n_classes) if not (d.y[te] == k).any()]
            if absent:
                raise LabelError(
                    f"CV fold {f} of {d.name} has no slide of classes {absent} (too few "
                    f"patients per class for folds={folds}); use fewer folds."
                )
            proba, c = _fit_predict(d.x, d.y, d.g, tr, te, seed=s + f, **fit)
            if r == 0:
                out.proba[te] = proba
                out.fold[te] = f
            assignment[te] = f
            sizes_tr.append(len(tr))
            blocks.append((te, d.y[te], proba, d.g[te], c))
        out.fold_runs.append(assignment.tolist())
    refit = _refit_config(fit, blocks)
    scores = [_boot_run(_cv_once, d.x[rows], d.y[rows], d.g[rows], folds, boot.seeds[b],
                        refit, d.n_classes) for b, rows in enumerate(boot.rows)]
    res = _summarise("cv", float(np.mean(sizes_tr)), None, blocks, d.n_classes, cv_repeats,
                     scores)
    out.results.append(res)
    out.roc.append(_mean_roc(res.name, [(b[1], b[2]) for b in blocks[:folds]], d.n_classes,
                             res.auc_mean))
    return out


def _report(d: _ProbeData, few_shot: _FewShot, cv: _CrossValidation, level: Level,
            config: dict) -> ProbeReport:
    report = ProbeReport(
        task="binary" if d.n_classes == 2 else "multiclass", classes=d.classes,
        results=tuple(few_shot.results + cv.results), roc=tuple(few_shot.roc + cv.roc),
        slide_ids=tuple(str(s) for s in d.row_ids), patients=tuple(str(p) for p in d.g),
        labels=tuple(str(v) for v in d.label_values),
        heldout=tuple(bool(h) for h in few_shot.heldout),
        cv_fold=tuple(int(f) for f in cv.fold), cv_proba=cv.proba, level=level,
        n_input_slides=d.n_input, config=config,
        heldout_runs=tuple(tuple(h) for h in few_shot.heldout_runs),
        cv_fold_runs=tuple(tuple(f) for f in cv.fold_runs),
    )
    for r in report.results:
        logger.info("probe %s: AUC %.3f ± %.3f (95%% CI %.3f-%.3f)", r.name, r.auc_mean,
                    r.auc_std, *r.auc_ci)
    return report
