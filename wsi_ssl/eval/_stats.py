"""Metrics with sample weights, and the intervals of every evaluation.

**Intervals** (:func:`refit_interval`): every 95 % interval of ``wsi_ssl.eval`` (probe few-shot
and CV, survival, the paired differences of ``compare``) comes from a *bootstrap that refits*:
``B`` resamples of patients with replacement (within each class, or each event status), and on
each the protocol rerun once (its splits and fits, with the hyper-parameters chosen on the real
cohort), which carries the variance of the cohort, the split and the fit. A bootstrap of one fitted model's held-out
predictions (the method before) leaves the last two out and was too narrow. Repeated splits
with the Nadeau-Bengio corrected t were tried and were too narrow too (``docs/eval.md``).
Paired differences use the same resamples and splits for both embeddings.

**Metrics** take a ``(B, n)`` weight matrix and return ``(B,)`` values (a patient-level bootstrap
resample is a vector of integer weights: how many times each slide's patient was drawn; the
retrieval report still uses it). With a single row of ones they equal scikit-learn's ``roc_auc_score`` /
``balanced_accuracy_score`` and lifelines' ``concordance_index`` (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "INTERVAL_METHOD",
    "BootstrapInterval",
    "MIN_BOOTSTRAP",
    "refit_interval",
    "bootstrap_rows",
    "group_folds",
    "repeat_seed",
    "auc_weighted",
    "macro_auc_weighted",
    "balanced_accuracy_weighted",
    "cindex_weighted",
    "cluster_bootstrap_weights",
    "percentile_ci",
]


def auc_weighted(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC (Mann-Whitney, ties count 1/2) for each row of ``weights``.

    Shape:
        positive: ``(n,)`` bool; scores: ``(n,)``; weights: ``(B, n)`` -> ``(B,)`` (NaN where a
        row has no positive or no negative weight).
    """
    positive = np.asarray(positive, bool)
    scores = np.asarray(scores, np.float64)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    pos = positive[order]
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    level = np.cumsum(np.r_[True, s[1:] != s[:-1]]) - 1  # tie level of each sorted sample
    neg_level = np.add.reduceat(w * ~pos, starts, axis=1)  # (B, L)
    below = np.cumsum(neg_level, axis=1) - neg_level
    credit = below[:, level] + 0.5 * neg_level[:, level]  # (B, n)
    num = (w * pos * credit).sum(axis=1)
    den = (w * pos).sum(axis=1) * (w * ~pos).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def macro_auc_weighted(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Binary AUC of ``proba[:, 1]`` for 2 classes, else the one-vs-rest macro AUC.

    Shape:
        y: ``(n,)`` int class codes; proba: ``(n, K)``; weights: ``(B, n)`` -> ``(B,)``.
    """
    proba = np.asarray(proba, np.float64)
    if proba.shape[1] == 2:
        return auc_weighted(y == 1, proba[:, 1], weights)
    per_class = [auc_weighted(y == k, proba[:, k], weights) for k in range(proba.shape[1])]
    return np.mean(per_class, axis=0)  # NaN if a class is missing from a resample


def balanced_accuracy_weighted(y: np.ndarray, pred: np.ndarray, n_classes: int,
                               weights: np.ndarray) -> np.ndarray:
    """Mean per-class recall with sample weights.

    Shape:
        y, pred: ``(n,)`` int; weights: ``(B, n)`` -> ``(B,)`` (NaN where a class has no weight).
    """
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    recalls = []
    for k in range(n_classes):
        member = y == k
        tot = (weights * member).sum(axis=1)
        hit = (weights * (member & (pred == k))).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls.append(np.where(tot > 0, hit / np.where(tot > 0, tot, 1.0), np.nan))
    return np.mean(recalls, axis=0)


def cindex_weighted(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
                    weights: np.ndarray) -> np.ndarray:
    """Harrell's concordance index of a risk score (higher = earlier event), weighted.

    Pair ``(i, j)`` is comparable when ``i`` had the event and left first (``T_i < T_j``, or
    ``T_i == T_j`` with ``j`` censored), lifelines' convention; concordant when ``risk_i >
    risk_j``, half when tied.

    Shape:
        time, event, risk: ``(n,)``; weights: ``(B, n)`` -> ``(B,)``.
    """
    t = np.asarray(time, np.float64)
    e = np.asarray(event).astype(bool)
    r = np.asarray(risk, np.float64)
    weights = np.atleast_2d(np.asarray(weights, np.float64))
    comp = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
    conc = comp * ((r[:, None] > r[None, :]) + 0.5 * (r[:, None] == r[None, :]))
    num = ((weights @ conc) * weights).sum(axis=1)
    den = ((weights @ comp.astype(np.float64)) * weights).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def cluster_bootstrap_weights(groups: np.ndarray, n_boot: int,
                              rng: np.random.Generator) -> np.ndarray:
    """Resample patients with replacement; each slide gets its patient's draw count.

    Shape:
        groups: ``(n,)`` patient ids -> ``(n_boot, n)`` float64 weights.
    """
    _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n_groups = int(codes.max()) + 1
    counts = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot)
    return counts[:, codes].astype(np.float64)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite bootstrap samples (NaN, NaN when fewer than 20)."""
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size < 20:
        return (float("nan"), float("nan"))
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


#: The name of the interval method, written into every report.
INTERVAL_METHOD: str = ("patient bootstrap with refitting: on each resample of patients the "
                        "splits and fits are redone (hyper-parameters as chosen on the real "
                        "cohort); 95 % interval = estimate ± t(B-1) x bootstrap sd")


@dataclass(frozen=True)
class BootstrapInterval:
    """A 95 % interval from a bootstrap that refits (see :func:`refit_interval`).

    Attributes:
        estimate: the point estimate (the mean of the ``runs`` on the real cohort).
        low, high: the interval (clipped to ``bounds``); NaN when fewer than
            :data:`MIN_BOOTSTRAP` resamples succeeded.
        std_error: the standard error used (see :func:`refit_interval`).
        p_value: two-sided p-value of ``estimate == null`` under the same t distribution.
        n_boot: resamples that gave a finite value.
    """

    estimate: float
    low: float
    high: float
    std_error: float
    p_value: float
    n_boot: int

    @property
    def interval(self) -> tuple[float, float]:
        return (self.low, self.high)

    def excludes(self, value: float) -> bool:
        """True when ``value`` lies outside the interval (False when there is none)."""
        return bool(np.isfinite(self.low) and (value < self.low or value > self.high))


#: Fewest successful resamples for an interval.
MIN_BOOTSTRAP: int = 10


def refit_interval(runs, boot, *, null: float = 0.0, level: float = 0.95,
                   bounds: tuple[float, float] | None = None) -> BootstrapInterval:
    """The 95 % interval of a metric averaged over ``R`` runs of a protocol, from ``B``
    resamples of patients on each of which ONE run of the protocol was refitted.

    The estimate is ``mean(runs)``. One bootstrap run varies by the cohort (``V_cohort``) and by
    the split and fit of the run (``V_run``); the estimate averages ``R`` runs on one cohort,
    so its variance is ``V_cohort + V_run / R``. With ``s2`` the variance of the real runs
    (an estimate of ``V_run``) and ``v*`` that of the bootstrap runs:
    ``se^2 = max(v* - (1 - 1/R) s2, s2 / R)``, and the interval is
    ``estimate ± t(0.975, B - 1) se``. With ``R = 1`` it is the usual normal bootstrap interval.

    Args:
        runs: ``(R,)`` the metric of each run on the real cohort (NaN runs are left out).
        boot: ``(B,)`` the metric of the one run on each resample (NaN: the resample failed).
        null: the value the p-value tests (0.5 for AUC / C-index, 0 for a difference).
        bounds: clip the interval to this range.
    """
    from scipy import stats  # lazy: scipy loads on first use, not on import

    r = np.asarray(runs, np.float64)
    r = r[np.isfinite(r)]
    b = np.asarray(boot, np.float64)
    b = b[np.isfinite(b)]
    nan = float("nan")
    est = float(r.mean()) if r.size else nan
    if b.size < MIN_BOOTSTRAP or not r.size:
        return BootstrapInterval(est, nan, nan, nan, nan, int(b.size))
    s2 = float(np.var(r, ddof=1)) if r.size > 1 else 0.0
    var = max(float(np.var(b, ddof=1)) - (1.0 - 1.0 / r.size) * s2, s2 / r.size)
    se = float(np.sqrt(var))
    if se == 0.0:  # e.g. identical embeddings: every difference is 0
        lo = hi = est
        p = 1.0 if est == null else 0.0
    else:
        q = float(stats.t.ppf(0.5 + level / 2.0, b.size - 1))
        lo, hi = est - q * se, est + q * se
        p = float(2.0 * stats.t.sf(abs(est - null) / se, b.size - 1))
    if bounds is not None:
        lo, hi = float(np.clip(lo, *bounds)), float(np.clip(hi, *bounds))
    return BootstrapInterval(est, float(lo), float(hi), se, p, int(b.size))


def bootstrap_rows(groups: np.ndarray, strata: np.ndarray, n_boot: int,
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Resamples of patients with replacement, within each stratum (so every class keeps its
    number of patients); each drawn patient brings all of its rows.

    Shape:
        groups, strata: ``(n,)`` per row -> ``n_boot`` arrays of row indices (a patient drawn
        twice appears twice; its copies keep its patient id, so splits keep them together).
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    codes, _ = pd.factorize(pd.Series(np.asarray(groups, dtype=object)))
    first = np.unique(codes, return_index=True)[1]
    rows_of = [np.flatnonzero(codes == c) for c in range(len(first))]
    stratum = np.asarray(strata)[first]
    levels = [np.flatnonzero(stratum == s) for s in np.unique(stratum)]
    out = []
    for _ in range(n_boot):
        drawn = np.concatenate([rng.choice(lv, lv.size, replace=True) for lv in levels])
        out.append(np.concatenate([rows_of[p] for p in np.sort(drawn)]))
    return out


def repeat_seed(seed: int, repeat: int) -> int:
    """The split seed of repeat ``repeat``: ``seed`` itself for the first (so one repeat is the
    single split of earlier versions), then independent 32-bit seeds."""
    if repeat == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**32, repeat]).generate_state(1)[0] >> 1)


def group_folds(strata: np.ndarray, groups: np.ndarray, n_splits: int,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, grouped k-fold splits for the bootstrap resamples (a fast stand-in for
    scikit-learn's ``StratifiedGroupKFold``, which costs ~50 ms per call on 100 groups): the
    groups of each stratum (a group's stratum is that of its first row) are shuffled and dealt
    to the folds in turn, continuing where the previous stratum stopped.

    Shape:
        strata, groups: ``(n,)`` -> ``n_splits`` pairs ``(train_idx, test_idx)``.
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    rng = np.random.default_rng(seed)
    codes, _ = pd.factorize(pd.Series(np.asarray(groups, dtype=object)))
    first = np.unique(codes, return_index=True)[1]
    stratum = np.asarray(strata)[first]
    fold_of_group = np.empty(len(first), np.int64)
    start = 0
    for s in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == s))
        fold_of_group[members] = (start + np.arange(members.size)) % n_splits
        start = (start + members.size) % n_splits
    fold = fold_of_group[codes]
    return [(np.flatnonzero(fold != k), np.flatnonzero(fold == k)) for k in range(n_splits)]
