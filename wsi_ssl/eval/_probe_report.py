"""Result objects of :func:`wsi_ssl.eval.linear_probe`: a table, JSON, and a figure."""

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

__all__ = ["ProbeResult", "RocCurve", "ProbeReport"]


@dataclass(frozen=True)
class ProbeResult:
    """One row of a probe report: a few-shot size or the repeated k-fold CV.

    Attributes:
        setting: ``"few-shot"`` (a subset of each random split's training side, scored on that
            split's held-out side) or ``"cv"`` (repeated k-fold CV on every labelled slide).
        n_labeled: slides the probe was trained on (mean over runs; CV: the mean training-fold
            size).
        requested: the ``n_labeled`` asked for (``None`` = the whole training side; CV: ``None``).
        runs: splits (few-shot: ``repeats``; CV: ``folds x cv_repeats``, repeat-major).
        auc_mean, auc_std: mean and population std of the AUC over runs (one-vs-rest macro AUC
            for more than two classes).
        auc_ci: 95 % interval of ``auc_mean`` from the bootstrap that refits (``auc_boot``,
            see ``docs/eval.md``), clipped to [0, 1].
        bacc_mean, bacc_std, bacc_ci: the same for balanced accuracy.
        auc_runs, bacc_runs: the per-run values.
        C: the inverse regularisation used in each run (chosen by inner CV or fixed).
        auc_p_value: two-sided p-value of ``auc_mean == 0.5`` under the same t distribution.
        repeats: CV: the repeats of the k-fold CV; few-shot: the splits (``runs``).
        auc_boot, bacc_boot: the metric of the one run refitted on each bootstrap resample
            (NaN where the resample could not be split or fitted).
    """

    setting: Literal["few-shot", "cv"]
    n_labeled: float
    requested: int | None
    runs: int
    auc_mean: float
    auc_std: float
    auc_ci: tuple[float, float]
    bacc_mean: float
    bacc_std: float
    bacc_ci: tuple[float, float]
    auc_runs: tuple[float, ...]
    bacc_runs: tuple[float, ...]
    C: tuple[float, ...]
    auc_p_value: float = float("nan")
    repeats: int = 1
    auc_boot: tuple[float, ...] = ()
    bacc_boot: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        """``"cv (5-fold)"``, ``"cv (5-fold x 5)"`` (5 repeats) or ``"n=25"`` /
        ``"n=all (73)"``."""
        if self.setting == "cv":
            k = self.runs // max(self.repeats, 1)
            return f"cv ({k}-fold)" if self.repeats <= 1 else f"cv ({k}-fold x {self.repeats})"
        if self.requested is None:
            return f"n=all ({int(self.n_labeled)})"
        return f"n={int(self.n_labeled)}"


@dataclass(frozen=True)
class RocCurve:
    """Mean ROC curve of one setting (macro over classes for multi-class, mean over runs).

    Shape:
        fpr, tpr: ``(101,)`` on a fixed false-positive-rate grid.
    """

    name: str
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]
    auc: float


@dataclass(frozen=True)
class ProbeReport(RowCounts):
    """What :func:`~wsi_ssl.eval.linear_probe` measured.

    Attributes:
        task: ``"binary"`` or ``"multiclass"``.
        classes: class names (sorted); for binary tasks ``classes[1]`` is the positive class.
        results: few-shot rows (ascending ``n_labeled``) then the CV row.
        roc: one mean ROC curve per result.
        slide_ids, patients, labels: the labelled cohort, in table order.
        heldout: per slide, True when it is on the held-out side of the first few-shot split.
        cv_fold: per slide, the fold of the first CV repeat in which it was scored (-1 when no
            CV was run).
        cv_proba: ``(n, K)`` out-of-fold class probabilities of the first CV repeat (empty when
            no CV was run).
        level: ``"slide"`` (one row per slide) or ``"patient"`` (one row per patient, the mean
            of its slide embeddings; ``slide_ids`` then holds the patient ids).
        n_input_slides: slides of the label table that were used.
        config: the parameters of the call.
        heldout_runs: per few-shot split, the row indices of its held-out side.
        cv_fold_runs: per CV repeat, every row's fold.
    """

    task: Literal["binary", "multiclass"]
    classes: tuple[str, ...]
    results: tuple[ProbeResult, ...]
    roc: tuple[RocCurve, ...]
    slide_ids: tuple[str, ...]
    patients: tuple[str, ...]
    labels: tuple[str, ...]
    heldout: tuple[bool, ...]
    cv_fold: tuple[int, ...]
    cv_proba: np.ndarray = field(repr=False, compare=False)
    level: Literal["slide", "patient"] = "slide"
    n_input_slides: int = -1
    config: dict[str, Any] = field(default_factory=dict, compare=False)
    heldout_runs: tuple[tuple[int, ...], ...] = ()
    cv_fold_runs: tuple[tuple[int, ...], ...] = ()

    @property
    def interval_method(self) -> str:
        """How every 95 % interval of the report was computed."""
        return INTERVAL_METHOD

    @property
    def cv(self) -> ProbeResult | None:
        """The CV row, if CV was run."""
        return next((r for r in self.results if r.setting == "cv"), None)

    def to_frame(self) -> pd.DataFrame:
        """One row per result: setting, n_labeled, runs, AUC and balanced accuracy with
        std and 95 % CI, the p-value of AUC = 0.5, median C and the interval method."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        rows = []
        for r in self.results:
            rows.append({
                "setting": r.setting, "name": r.name, "n_labeled": r.n_labeled,
                "requested": r.requested, "runs": r.runs,
                "auc_mean": r.auc_mean, "auc_std": r.auc_std,
                "auc_ci_low": r.auc_ci[0], "auc_ci_high": r.auc_ci[1],
                "bacc_mean": r.bacc_mean, "bacc_std": r.bacc_std,
                "bacc_ci_low": r.bacc_ci[0], "bacc_ci_high": r.bacc_ci[1],
                "auc_p_value": r.auc_p_value,
                "C": float(np.median(r.C)) if r.C else float("nan"),
                "interval": INTERVAL_METHOD,
            })
        return pd.DataFrame(rows)

    def predictions(self) -> pd.DataFrame:
        """Per slide: id, patient, label, held-out flag, CV fold and out-of-fold probabilities."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        df = pd.DataFrame({"slide_id": self.slide_ids, "patient_id": self.patients,
                           "label": self.labels, "heldout": self.heldout,
                           "cv_fold": self.cv_fold})
        if self.cv_proba.size:
            for k, c in enumerate(self.classes):
                df[f"proba_{c}"] = self.cv_proba[:, k]
        return df

    def to_json(self) -> str:
        """Strict JSON: task, classes, counts, config, results (with per-run values), ROC
        curves and the splits (so a run can be checked and reproduced)."""
        return dumps({
            "kind": "wsi-ssl linear probe",
            "task": self.task, "classes": self.classes,
            "n_slides": self.n_slides, "n_patients": self.n_patients, "level": self.level,
            "n_rows": self.n_rows, "interval_method": INTERVAL_METHOD,
            "config": self.config,
            "results": [dict(asdict(r), name=r.name) for r in self.results],
            "roc": [asdict(c) for c in self.roc],
            "splits": {"slide_id": self.slide_ids, "patient_id": self.patients,
                       "label": self.labels, "heldout": self.heldout,
                       "cv_fold": self.cv_fold, "heldout_runs": self.heldout_runs,
                       "cv_fold_runs": self.cv_fold_runs},
        })

    def plot(self) -> Figure:
        """Learning curve (AUC against n labeled, std band and 95 % CI bars, the CV AUC as a
        line) and the mean ROC curves."""
        from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

        fig = Figure(figsize=(11, 4.5))
        ax_lc, ax_roc = fig.subplots(1, 2)
        few = [r for r in self.results if r.setting == "few-shot"]
        if few:
            n = np.array([r.n_labeled for r in few])
            m = np.array([r.auc_mean for r in few])
            s = np.array([r.auc_std for r in few])
            lo = np.array([r.auc_ci[0] for r in few])
            hi = np.array([r.auc_ci[1] for r in few])
            ax_lc.fill_between(n, m - s, m + s, alpha=0.2, label="± std over splits")
            ax_lc.errorbar(n, m, yerr=np.abs(np.vstack([m - lo, hi - m])), marker="o",
                           capsize=3, label="mean AUC, 95 % CI")
        if self.cv is not None:
            ax_lc.axhline(self.cv.auc_mean, color="k", ls="--",
                          label=f"{self.cv.name}: {self.cv.auc_mean:.3f}")
        ax_lc.axhline(0.5, color="grey", ls=":", lw=1)
        ax_lc.set_xlabel("labelled slides (n)")
        ax_lc.set_ylabel("AUC" if self.task == "binary" else "macro AUC (one-vs-rest)")
        ax_lc.set_title("Few-shot learning curve")
        ax_lc.set_ylim(0.0, 1.02)
        ax_lc.legend(loc="lower right", fontsize=8)
        for c in self.roc:
            ax_roc.plot(c.fpr, c.tpr, label=f"{c.name} (AUC {c.auc:.3f})")
        ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
        ax_roc.set_xlabel("false positive rate")
        ax_roc.set_ylabel("true positive rate")
        title = f"ROC ({self.classes[1]} vs {self.classes[0]})" if self.task == "binary" \
            else "ROC (macro one-vs-rest)"
        ax_roc.set_title(title)
        ax_roc.legend(loc="lower right", fontsize=8)
        fig.suptitle(f"Linear probe: {self.n_slides} slides, {self.n_patients} patients, "
                     f"level {self.level}, {len(self.classes)} classes\n95 % CI: "
                     f"{INTERVAL_METHOD}", fontsize=9)
        fig.tight_layout()
        return fig

    def save(self, out_dir: str | os.PathLike, *, prefix: str = "probe") -> dict[str, Path]:
        """Write ``probe.json``, ``probe.png``, ``probe.csv`` (the table) and
        ``probe_predictions.csv`` into ``out_dir``; return the paths by kind."""
        return write_report(out_dir, prefix, json_text=self.to_json(), fig=self.plot(),
                            frame=self.to_frame(), extra={"predictions": self.predictions()})
