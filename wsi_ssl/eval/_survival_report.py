"""Result objects of :func:`wsi_ssl.eval.survival`: per-fold table, JSON and Kaplan-Meier plot."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.eval._report_io import RowCounts, dumps, write_report
from wsi_ssl.eval._stats import INTERVAL_METHOD

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["SurvivalFold", "SurvivalReport"]


@dataclass(frozen=True)
class SurvivalFold:
    """One outer fold.

    Attributes:
        fold, n_train, n_test, n_events_test: the fold and its sizes (rows: slides or patients).
        n_features: inputs of the Cox model (the embedding dimension, or the PCA components).
        alpha, l1_ratio: the coxnet penalty and elastic-net mixing chosen by the inner CV.
        n_nonzero: coefficients of the fitted model that are not zero.
        failed_fits: inner fits (or refits) that raised, each counted, none scored.
        convergence_warnings: convergence warnings raised while fitting this fold.
        c_index: Harrell's C-index on the test fold.
        repeat: the repeat of the k-fold CV this fold belongs to.
    """

    fold: int
    n_train: int
    n_test: int
    n_events_test: int
    n_features: int
    alpha: float
    l1_ratio: float
    n_nonzero: int
    failed_fits: int
    convergence_warnings: int
    c_index: float
    repeat: int = 0


@dataclass(frozen=True)
class SurvivalReport(RowCounts):
    """What :func:`~wsi_ssl.eval.survival` measured.

    Attributes:
        c_index_mean, c_index_std: Harrell's C-index over the outer folds of every repeat
            (population std).
        c_index_ci: 95 % interval of ``c_index_mean`` from the patient bootstrap that refits
            the whole CV on each resample (``c_index_boot``; ``docs/eval.md``), clipped to
            [0, 1].
        folds: one :class:`SurvivalFold` per outer fold of every repeat (repeat-major).
        logrank_p: log-rank p-value between the out-of-fold high- and low-risk groups of the
            first repeat (descriptive: it treats the risk groups as given, like any
            out-of-fold log-rank test; the interval is the calibrated statement).
        slide_ids, patients, time, event: the cohort in table order.
        risk: out-of-fold log partial hazard of the first repeat (higher = earlier event;
            comparable within a fold).
        high_risk: risk above the median training risk of the slide's fold (first repeat).
        cv_fold: the fold in which each slide was scored (first repeat).
        level: ``"slide"`` (one row per slide) or ``"patient"`` (one row per patient, the mean
            of its slide embeddings; ``slide_ids`` then holds the patient ids).
        n_input_slides: slides of the clinical table that were used.
        config: the parameters of the call.
        c_index_p_value: two-sided p-value of ``c_index_mean == 0.5`` (same t distribution).
        repeats: repeats of the k-fold CV.
        c_index_boot: the mean C-index of the one CV refitted on each bootstrap resample.
    """

    c_index_mean: float
    c_index_std: float
    c_index_ci: tuple[float, float]
    folds: tuple[SurvivalFold, ...]
    logrank_p: float
    slide_ids: tuple[str, ...]
    patients: tuple[str, ...]
    time: tuple[float, ...]
    event: tuple[int, ...]
    risk: tuple[float, ...]
    high_risk: tuple[bool, ...]
    cv_fold: tuple[int, ...]
    level: Literal["slide", "patient"] = "slide"
    n_input_slides: int = -1
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    c_index_p_value: float = float("nan")
    repeats: int = 1
    c_index_boot: tuple[float, ...] = ()

    @property
    def interval_method(self) -> str:
        """How the 95 % interval was computed."""
        return INTERVAL_METHOD

    @property
    def no_feature_kept(self) -> bool:
        """True when the penalised Cox model of every fold kept no feature (constant risk):
        the search found no prognostic signal, and the C-index is 0.5 by construction."""
        return bool(self.folds) and all(f.n_nonzero == 0 for f in self.folds)

    @property
    def note(self) -> str:
        """A sentence for what the numbers alone would hide ("" when there is nothing to say)."""
        if self.no_feature_kept:
            return "no feature was kept: no prognostic signal found"
        empty = sum(f.n_nonzero == 0 for f in self.folds)
        if empty:
            return (f"no feature was kept in {empty} of {len(self.folds)} folds (C-index 0.5 "
                    "there by construction)")
        return ""

    @property
    def n_events(self) -> int:
        """Rows with an event (patients at ``level="patient"``)."""
        return int(sum(self.event))

    @property
    def failed_fits(self) -> int:
        """Inner fits that failed, over every fold."""
        return sum(f.failed_fits for f in self.folds)

    @property
    def convergence_warnings(self) -> int:
        """Convergence warnings raised while fitting, over every fold."""
        return sum(f.convergence_warnings for f in self.folds)

    @property
    def summary(self) -> str:
        """One line: C-index mean ± std [95 % CI] and p, log-rank p, counts, level, fit problems
        (or, when no fold kept a feature, that sentence instead of the degenerate numbers)."""
        lo, hi = self.c_index_ci
        rows = ("one row per slide" if self.level == "slide"
                else f"one row per patient: mean of {self.n_slides} slides")
        k = len(self.folds) // max(self.repeats, 1)
        cv = f"{k}-fold CV x {self.repeats}" if self.repeats > 1 else f"{k}-fold CV"
        if self.no_feature_kept:
            head = (f"{self.note} (the penalised Cox model kept no feature in any of the "
                    f"{len(self.folds)} folds; C-index 0.5 by construction)")
        else:
            head = (f"C-index {self.c_index_mean:.3f} ± {self.c_index_std:.3f} "
                    f"[95% CI {lo:.3f}-{hi:.3f}, p={self.c_index_p_value:.3g}; {cv}, patient "
                    f"bootstrap with refitting x {len(self.c_index_boot)}], "
                    f"log-rank p={self.logrank_p:.3g} (first repeat)")
            if self.note:
                head += f"; {self.note}"
        return (f"{head} ({self.n_slides} slides, {self.n_patients} patients, {self.n_events} "
                f"events; level {self.level}, {rows}; {self.failed_fits} failed inner fits, "
                f"{self.convergence_warnings} convergence warnings)")

    def to_frame(self) -> pd.DataFrame:
        """One row per outer fold (the fields of :class:`SurvivalFold`)."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        return pd.DataFrame([asdict(f) for f in self.folds])

    def risk_table(self) -> pd.DataFrame:
        """Per slide: id, patient, time, event, out-of-fold risk, risk group and fold."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        first = "slide_id" if self.level == "slide" else "row_id"
        return pd.DataFrame({first: self.slide_ids, "patient_id": self.patients,
                             "time": self.time, "event": self.event, "risk": self.risk,
                             "high_risk": self.high_risk, "cv_fold": self.cv_fold})

    def to_json(self) -> str:
        """Strict JSON: summary, config, folds and the out-of-fold risk of every slide."""
        return dumps({
            "kind": "wsi-ssl survival",
            "c_index_mean": self.c_index_mean, "c_index_std": self.c_index_std,
            "c_index_ci": self.c_index_ci, "c_index_p_value": self.c_index_p_value,
            "interval_method": INTERVAL_METHOD, "repeats": self.repeats,
            "no_feature_kept": self.no_feature_kept, "note": self.note,
            "summary": self.summary, "logrank_p": self.logrank_p,
            "c_index_boot": self.c_index_boot,
            "n_slides": self.n_slides, "n_patients": self.n_patients, "n_events": self.n_events,
            "level": self.level, "n_rows": self.n_rows, "failed_fits": self.failed_fits,
            "convergence_warnings": self.convergence_warnings,
            "config": self.config, "folds": [asdict(f) for f in self.folds],
            "slides": self.risk_table().to_dict(orient="list"),
        })

    def plot(self) -> Figure:
        """Kaplan-Meier curves (95 % bands) of the out-of-fold low/high risk groups with the
        log-rank p-value, and the C-index of each fold."""
        from lifelines import KaplanMeierFitter  # lazy: lifelines only for survival analysis
        from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

        fig = Figure(figsize=(11, 4.5))
        ax_km, ax_c = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        t, e, high = np.asarray(self.time), np.asarray(self.event), np.asarray(self.high_risk)
        for mask, label, color in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
            if not mask.any():
                continue
            km = KaplanMeierFitter().fit(t[mask], e[mask])
            sf = km.survival_function_.iloc[:, 0]
            ci = km.confidence_interval_
            ax_km.step(sf.index, sf.to_numpy(), where="post", color=color,
                       label=f"{label} (n={int(mask.sum())}, events={int(e[mask].sum())})")
            ax_km.fill_between(ci.index, ci.iloc[:, 0], ci.iloc[:, 1], step="post",
                               color=color, alpha=0.15)
        ax_km.set_xlabel(f"time ({self.config.get('time', 'time')})")
        ax_km.set_ylabel("survival probability")
        ax_km.set_ylim(0, 1.02)
        ax_km.set_title("no feature was kept: no prognostic signal found"
                        if self.no_feature_kept else
                        f"Out-of-fold risk groups (first repeat), log-rank p = "
                        f"{self.logrank_p:.3g}")
        ax_km.legend(loc="lower left", fontsize=8)
        cs = [f.c_index for f in self.folds]
        ax_c.bar(range(len(cs)), cs, color="tab:gray")
        lo, hi = self.c_index_ci
        if np.isfinite(lo):
            ax_c.axhspan(lo, hi, color="tab:blue", alpha=0.15, label="95 % CI (bootstrap, refitted)")
        ax_c.axhline(self.c_index_mean, color="k", ls="--",
                     label=f"mean {self.c_index_mean:.3f}")
        ax_c.axhline(0.5, color="grey", ls=":", lw=1)
        ax_c.set_xlabel("fold (every repeat)")
        ax_c.set_ylabel("C-index")
        ax_c.set_ylim(0, 1)
        ax_c.legend(loc="lower right", fontsize=8)
        fig.suptitle(f"Penalised Cox model on slide embeddings: {self.summary}", fontsize=8)
        fig.tight_layout()
        return fig

    def save(self, out_dir: str | os.PathLike, *, prefix: str = "survival") -> dict[str, Path]:
        """Write ``survival.json``, ``survival.png``, ``survival.csv`` (per fold) and
        ``survival_risk.csv`` (per slide) into ``out_dir``; return the paths by kind."""
        return write_report(out_dir, prefix, json_text=self.to_json(), fig=self.plot(),
                            frame=self.to_frame(), extra={"risk": self.risk_table()})
