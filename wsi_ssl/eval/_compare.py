"""Side-by-side evaluation of several slide-embedding files of the same slides, with paired
differences on the same splits.

Every file goes through the same :func:`~wsi_ssl.eval.linear_probe` (few-shot sizes and k-fold
CV) and, when a time column is given, the same :func:`~wsi_ssl.eval.survival`, on the same rows
in the same order with the same seed: so the held-out splits, the CV folds, the labelled
subsets and the bootstrap resamples of patients are identical for every file (checked). The
difference of two files is then computed split by split and resample by resample, and its 95 %
interval comes from the same bootstrap that refits as every other interval
(:func:`wsi_ssl.eval._stats.refit_interval`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl._utils import atomic_write_bytes, sanitize_id
from wsi_ssl.errors import ConfigError, LabelError
from wsi_ssl.eval._inputs import (
    EmbeddingsLike,
    Level,
    TableLike,
    as_embeddings,
    few,
    read_table,
    strip_slide_extension,
)
from wsi_ssl.eval._probe import linear_probe
from wsi_ssl.eval._probe_report import ProbeReport
from wsi_ssl.eval._report_io import ReportSection, dumps, write_html_report
from wsi_ssl.eval._stats import INTERVAL_METHOD, refit_interval
from wsi_ssl.eval._survival import survival
from wsi_ssl.eval._survival_report import SurvivalReport

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = ["compare_embeddings", "CompareReport", "CompareScore", "PairedDifference"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareScore:
    """One embedding file in one setting.

    Attributes:
        setting: ``"n=25"``, ``"n=all (73)"``, ``"cv (5-fold)"`` (probe AUC) or ``"survival"``
            (C-index).
        metric: ``"AUC"`` or ``"C-index"``.
        name: the embedding file.
        mean: the metric (mean over runs).
        low, high: its 95 % interval (bootstrap that refits).
        p_value: two-sided p-value of ``mean == 0.5``.
        runs: splits (few-shot) or folds (CV, survival) behind ``mean``.
    """

    setting: str
    metric: str
    name: str
    mean: float
    low: float
    high: float
    p_value: float
    runs: int


@dataclass(frozen=True)
class PairedDifference:
    """``a - b`` in one setting, on the same splits and bootstrap resamples.

    Attributes:
        setting, metric: as in :class:`CompareScore`.
        a, b: the two embedding files.
        mean: mean of the per-run differences (exactly 0 for identical files).
        low, high: 95 % interval (bootstrap that refits, paired resample by resample).
        p_value: two-sided p-value of ``mean == 0``.
        n_boot: bootstrap resamples that succeeded for both files.
    """

    setting: str
    metric: str
    a: str
    b: str
    mean: float
    low: float
    high: float
    p_value: float
    n_boot: int

    @property
    def excludes_zero(self) -> bool:
        return bool(np.isfinite(self.low) and (self.low > 0 or self.high < 0))


@dataclass(frozen=True)
class CompareReport:
    """What :func:`compare_embeddings` measured.

    Attributes:
        names: the embedding files, in the order given.
        scores: one :class:`CompareScore` per setting and file.
        differences: one :class:`PairedDifference` per setting and pair ``(a, b)`` with ``a``
            before ``b`` in ``names``.
        n_slides: slides (rows of the table) evaluated: those present in every file.
        n_patients: their patients.
        n_dropped: rows of the table left out because a file lacks them.
        dropped_ids: those slide ids.
        probes, survivals: the full report of each file (``None`` for a task not run).
        config: the parameters of the call.
    """

    names: tuple[str, ...]
    scores: tuple[CompareScore, ...]
    differences: tuple[PairedDifference, ...]
    n_slides: int
    n_patients: int
    n_dropped: int
    dropped_ids: tuple[str, ...]
    probes: tuple[ProbeReport | None, ...] = field(repr=False, compare=False, default=())
    survivals: tuple[SurvivalReport | None, ...] = field(repr=False, compare=False,
                                                         default=())
    config: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def interval_method(self) -> str:
        """How every 95 % interval (scores and differences) was computed."""
        return INTERVAL_METHOD

    @property
    def settings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.setting for s in self.scores))

    def score(self, setting: str, name: str) -> CompareScore:
        """The score of file ``name`` in ``setting`` (``"cv"`` matches the CV row)."""
        for s in self.scores:
            if _matches(s.setting, setting) and s.name == name:
                return s
        raise KeyError(f"no score for setting {setting!r} and file {name!r}; settings are "
                       f"{list(self.settings)}, files {list(self.names)}.")

    def difference(self, setting: str, a: str, b: str) -> PairedDifference:
        """``a - b`` in ``setting`` (``"cv"`` matches the CV row); either order works."""
        for d in self.differences:
            if not _matches(d.setting, setting):
                continue
            if (d.a, d.b) == (a, b):
                return d
            if (d.a, d.b) == (b, a):
                return PairedDifference(d.setting, d.metric, a, b, -d.mean, -d.high, -d.low,
                                        d.p_value, d.n_boot)
        raise KeyError(f"no difference for setting {setting!r} and files {a!r}, {b!r}; "
                       f"settings are {list(self.settings)}, files {list(self.names)}.")

    @property
    def summary(self) -> str:
        """One line: what was compared, on how many slides, with which interval."""
        drop = (f"; {self.n_dropped} slides of the table not in every file were left out"
                if self.n_dropped else "")
        return (f"{len(self.names)} embedding files ({', '.join(self.names)}) on "
                f"{self.n_slides} slides of {self.n_patients} patients{drop}; 95 % CI: "
                f"{INTERVAL_METHOD}")

    def to_frame(self) -> pd.DataFrame:
        """One table: a ``score`` row per setting and file, then a ``difference`` row per
        setting and pair (``name`` = ``"a - b"``), with mean, 95 % CI and p-value."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        rows = [{"kind": "score", "setting": s.setting, "metric": s.metric, "name": s.name,
                 "mean": s.mean, "ci_low": s.low, "ci_high": s.high, "p_value": s.p_value,
                 "null": 0.5} for s in self.scores]
        rows += [{"kind": "difference", "setting": d.setting, "metric": d.metric,
                  "name": f"{d.a} - {d.b}", "mean": d.mean, "ci_low": d.low, "ci_high": d.high,
                  "p_value": d.p_value, "null": 0.0} for d in self.differences]
        return pd.DataFrame(rows)

    def to_markdown(self) -> str:
        """Markdown: the settings as rows and the files as columns ("mean [low, high]"), then
        the paired differences, with the interval method and the dropped slides."""
        def cell(m, lo, hi):
            return f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else f"{m:.3f}"

        lines = [f"**Comparison of slide embeddings.** {self.summary}.", ""]
        lines.append("| setting | metric | " + " | ".join(self.names) + " |")
        lines.append("|---|---|" + "---|" * len(self.names))
        for setting in self.settings:
            row = [s for s in self.scores if s.setting == setting]
            by = {s.name: s for s in row}
            lines.append(f"| {setting} | {row[0].metric} | " + " | ".join(
                cell(by[n].mean, by[n].low, by[n].high) if n in by else "-"
                for n in self.names) + " |")
        if self.differences:
            lines += ["", "| setting | difference | mean [95 % CI] | p |", "|---|---|---|---|"]
            for d in self.differences:
                star = " *" if d.excludes_zero else ""
                lines.append(f"| {d.setting} | {d.a} - {d.b} | {cell(d.mean, d.low, d.high)}"
                             f"{star} | {d.p_value:.3g} |")
            lines += ["", "\\* the 95 % interval excludes 0."]
        notes = [f"{s.name}: {s.setting} {n}" for s in self.survivals if s is not None
                 for n in [s.note] if n] if self.survivals else []
        if notes:
            lines += ["", "Notes: " + "; ".join(notes) + "."]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """Strict JSON: names, counts, config, scores and differences."""

        return dumps({
            "kind": "wsi-ssl compare", "names": self.names, "n_slides": self.n_slides,
            "n_patients": self.n_patients, "n_dropped": self.n_dropped,
            "dropped_ids": self.dropped_ids, "interval_method": INTERVAL_METHOD,
            "config": self.config, "scores": [asdict(s) for s in self.scores],
            "differences": [asdict(d) for d in self.differences],
        })

    def plot(self) -> Figure:
        """Left: each setting's metric per file with its 95 % CI; right: the paired
        differences with their 95 % CI against 0."""
        from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

        fig = Figure(figsize=(12, 0.9 + 0.45 * max(len(self.settings) * len(self.names),
                                                     len(self.differences), 4)))
        ax_s, ax_d = fig.subplots(1, 2)
        y, labels, pos = 0.0, [], []
        colors = {n: f"C{i}" for i, n in enumerate(self.names)}
        for setting in reversed(self.settings):
            for name in reversed(self.names):
                s = next((s for s in self.scores if s.setting == setting and s.name == name),
                         None)
                if s is None:
                    continue
                err = [[max(s.mean - s.low, 0)], [max(s.high - s.mean, 0)]] \
                    if np.isfinite(s.low) else None
                ax_s.errorbar([s.mean], [y], xerr=err, fmt="o", color=colors[name], capsize=3)
                labels.append(f"{setting}: {name}")
                pos.append(y)
                y += 1
            y += 0.5
        ax_s.set_yticks(pos)
        ax_s.set_yticklabels(labels, fontsize=8)
        ax_s.axvline(0.5, color="grey", ls=":", lw=1)
        ax_s.set_xlabel("AUC (probe) / C-index (survival), 95 % CI")
        ax_s.set_title("Scores")
        dl = []
        for i, d in enumerate(reversed(self.differences)):
            err = [[max(d.mean - d.low, 0)], [max(d.high - d.mean, 0)]] \
                if np.isfinite(d.low) else None
            ax_d.errorbar([d.mean], [i], xerr=err, fmt="s",
                          color="tab:red" if d.excludes_zero else "k", capsize=3)
            dl.append(f"{d.setting}: {d.a} - {d.b}")
        ax_d.set_yticks(range(len(dl)))
        ax_d.set_yticklabels(dl, fontsize=8)
        ax_d.axvline(0.0, color="grey", ls=":", lw=1)
        ax_d.set_xlabel("paired difference, 95 % CI (red: excludes 0)")
        ax_d.set_title("Paired differences (same splits and resamples)")
        fig.suptitle(f"{self.summary}", fontsize=8, wrap=True)
        fig.tight_layout()
        return fig

    def html_section(self, png: str | os.PathLike | None = None) -> ReportSection:
        """This comparison as a section of an HTML report (``write_html_report``)."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        frame = self.to_frame()
        scores = frame[frame["kind"] == "score"].drop(columns=["kind", "null"])
        diffs = frame[frame["kind"] == "difference"].drop(columns=["kind", "null"])
        return ReportSection(
            title="Comparison of slide embeddings", text=self.summary,
            tables=(("scores (95 % CI)", scores.reset_index(drop=True)),
                    ("paired differences (95 % CI)", diffs.reset_index(drop=True))
                    if len(diffs) else ("paired differences", pd.DataFrame())),
            figures=(("scores and paired differences", Path(png)),) if png else ())

    def save(self, out_dir: str | os.PathLike, *, prefix: str = "compare") -> dict[str, Path]:
        """Write ``compare.csv`` (the table), ``compare.md``, ``compare.png``, ``compare.json``
        and ``compare.html`` into ``out_dir``; return the paths by kind."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: out / f"{prefix}.{k}" for k in ("csv", "md", "png", "json", "html")}
        atomic_write_bytes(paths["csv"], self.to_frame().to_csv(index=False).encode("utf-8"))
        atomic_write_bytes(paths["md"], self.to_markdown().encode("utf-8"))
        atomic_write_bytes(paths["json"], self.to_json().encode("utf-8"))
        self.plot().savefig(paths["png"], dpi=120, bbox_inches="tight")
        write_html_report(paths["html"], title="wsi-ssl compare",
                          settings={"files": ", ".join(self.names),
                                    "slides": self.n_slides, "patients": self.n_patients,
                                    "left out (not in every file)": self.n_dropped,
                                    "interval": INTERVAL_METHOD},
                          sections=[self.html_section(paths["png"])])
        return paths


def _matches(setting: str, query: str) -> bool:
    return setting == query or (query == "cv" and setting.startswith("cv ("))


def _name_files(files: Mapping[str, EmbeddingsLike] | Sequence[EmbeddingsLike]
                ) -> dict[str, EmbeddingsLike]:
    if isinstance(files, Mapping):
        named = {str(k): v for k, v in files.items()}
    else:
        named = {}
        for i, f in enumerate(files):
            stem = Path(f).stem if isinstance(f, (str, os.PathLike)) else f"embeddings{i}"
            if stem in named:
                raise ConfigError(
                    f"two embedding files are both named {stem!r} (from their file names); "
                    "give names: {'a': path_a, 'b': path_b} (CLI: a=path_a b=path_b).")
            named[stem] = f
    if len(named) < 2:
        raise ConfigError(f"compare needs at least two embedding files; got {len(named)}.")
    return named


def _key(slide_id: str) -> str:
    return sanitize_id(strip_slide_extension(str(slide_id)))


def _common_slides(df, embeddings: Mapping[str, Any], *, id_col: str, table_name: str):
    """The rows of ``df`` whose slide is in every embedding file (re-indexed), and the ids of
    those left out (warned about)."""
    keys = df[id_col].map(_key)
    present = np.ones(len(df), bool)
    for emb in embeddings.values():
        have = {_key(s) for s in emb.slide_ids}
        present &= keys.isin(have).to_numpy()
    dropped = df.loc[~present, id_col].astype(str).tolist()
    if not present.any():
        raise LabelError(
            f"no slide of {table_name} is in every embedding file ({', '.join(embeddings)}); "
            "check that the files embed the same slides and the id column (--id-col).")
    if dropped:
        warnings.warn(
            f"{len(dropped)} of {len(df)} slides of {table_name} are not in every embedding "
            f"file and are left out of the comparison: {few(dropped)}.", UserWarning,
            stacklevel=3)
    return df.loc[present].reset_index(drop=True), dropped


def compare_embeddings(
    files_or_embeddings: Mapping[str, EmbeddingsLike] | Sequence[EmbeddingsLike],
    labels_or_clinical_table: TableLike,
    *,
    label_col: str | None = "label",
    time: str | None = None,
    event: str | None = None,
    censor_col: str | None = None,
    id_col: str = "slide_id",
    patient_col: str | None = "patient_id",
    level: Level = "slide",
    n_labeled: Sequence[int | None] = (25, 50, 100, None),
    repeats: int = 10,
    test_size: float = 0.25,
    folds: int | None = 5,
    cv_repeats: int = 1,
    C: Literal["cv"] | float | Sequence[float] = "cv",
    groups: Literal["patient"] | None = "patient",
    n_bootstrap: int = 50,
    seed: int = 0,
    survival_kwargs: Mapping[str, Any] | None = None,
) -> CompareReport:
    """Compare several slide-embedding files of the same slides on one label/clinical table.

    Each file gets the same few-shot probe (AUC at each ``n``), the same k-fold CV probe, and,
    when ``time`` is given, the same penalised Cox model (C-index), on the same splits and
    bootstrap resamples; each pair of files gets the paired difference with its 95 % interval.

    Args:
        files_or_embeddings: ``{name: path or SlideEmbeddings}``, or a list of paths (named by
            their file stems).
        labels_or_clinical_table: DataFrame or CSV/TSV/parquet with ``id_col`` and the label
            column and/or the time and event columns.
        label_col: the class column of the probe; ``None`` (or a column the table lacks, when
            ``time`` is given) runs survival only.
        time, event, censor_col: the survival columns (as in :func:`survival`); no ``time``:
            no survival.
        n_labeled, repeats, test_size, folds, cv_repeats, C, groups: as in
            :func:`linear_probe` (``n_labeled=()``: CV only; ``folds=None``: few-shot only).
        n_bootstrap: resamples of patients for every interval (as in :func:`linear_probe`).
        seed: one seed for every file, so the splits are the same.
        survival_kwargs: more arguments of :func:`survival` (e.g. ``alpha``, ``l1_ratio``).

    Returns:
        A :class:`CompareReport` (``to_frame()``, ``to_markdown()``, ``plot()``, ``save(dir)``).

    Raises:
        ConfigError: fewer than two files, duplicated names, nothing to evaluate.
        LabelError: the table problems of :func:`linear_probe` / :func:`survival`; no slide
            present in every file.
    """
    named = _name_files(files_or_embeddings)
    embeddings = {n: as_embeddings(f) for n, f in named.items()}
    df, table_name = read_table(labels_or_clinical_table, id_col=id_col, what="labels")
    run_probe = label_col is not None and (label_col in df.columns or time is None)
    if not run_probe and time is None:
        raise ConfigError("compare has nothing to evaluate: pass label_col= (--label-col) for "
                          "the probe and/or time= (--time-col) for survival.")
    if label_col is not None and not run_probe:
        logger.info("compare: the table has no column %r; survival only.", label_col)
    table, dropped = _common_slides(df, embeddings, id_col=id_col, table_name=table_name)
    common = dict(id_col=id_col, patient_col=patient_col, level=level, groups=groups,
                  n_bootstrap=n_bootstrap, seed=seed)
    probe_kw = None if not run_probe else dict(
        label_col=label_col, n_labeled=n_labeled, repeats=repeats, test_size=test_size,
        folds=folds, cv_repeats=cv_repeats, C=C, **common)
    survival_kw = None if time is None else dict(
        time=time, event=event, censor_col=censor_col,
        **{"folds": folds or 5, **common, **(survival_kwargs or {})})
    probes, survs = _evaluate_each(embeddings, table, probe_kw, survival_kw)
    _check_same_splits(list(named), probes, survs)
    names = tuple(named)
    scores, diffs = _scores_and_differences(names, probes, survs)
    ref = next(r for r in (*probes, *survs) if r is not None)
    config = {"names": list(names), "label_col": label_col if run_probe else None,
              "time": time, "event": event, "censor_col": censor_col, "id_col": id_col,
              "patient_col": patient_col, "level": level, "n_labeled": list(n_labeled),
              "repeats": repeats, "test_size": test_size, "folds": folds,
              "cv_repeats": cv_repeats, "C": C if isinstance(C, (str, int, float)) else list(C),
              "groups": groups, "n_bootstrap": n_bootstrap, "seed": seed,
              "survival_kwargs": dict(survival_kwargs or {}), "interval": INTERVAL_METHOD,
              "sources": {n: e.provenance.get("source", "") for n, e in embeddings.items()}}
    return CompareReport(
        names=names, scores=tuple(scores), differences=tuple(diffs), n_slides=len(table),
        n_patients=ref.n_patients, n_dropped=len(dropped), dropped_ids=tuple(dropped),
        probes=tuple(probes), survivals=tuple(survs), config=config)


def _evaluate_each(embeddings: Mapping[str, Any], table, probe_kw: dict | None,
                   survival_kw: dict | None
                   ) -> tuple[list[ProbeReport | None], list[SurvivalReport | None]]:
    """The probe (``probe_kw`` None: none) and the survival model (``survival_kw`` None: none)
    of every file, on the same table."""
    probes: list[ProbeReport | None] = []
    survs: list[SurvivalReport | None] = []
    for name, emb in embeddings.items():
        probes.append(None)
        survs.append(None)
        if probe_kw is not None:
            logger.info("compare: probing %s", name)
            probes[-1] = linear_probe(emb, table, **probe_kw)
        if survival_kw is not None:
            logger.info("compare: survival of %s", name)
            survs[-1] = survival(emb, table, **survival_kw)
    return probes, survs


def _check_same_splits(names, probes, survs) -> None:
    """Every file must have been evaluated on the same rows and splits (same ids, held-out
    sides, folds): the paired differences rest on it."""
    for reports, what in ((probes, "probe"), (survs, "survival")):
        done = [(n, r) for n, r in zip(names, reports, strict=True) if r is not None]
        for n, r in done[1:]:
            n0, r0 = done[0]
            same = r.slide_ids == r0.slide_ids and r.cv_fold == r0.cv_fold
            if what == "probe":
                same = same and r.heldout_runs == r0.heldout_runs \
                    and r.cv_fold_runs == r0.cv_fold_runs
            if not same:  # pragma: no cover - would be a bug in the seeding
                raise RuntimeError(f"the {what} splits of {n!r} and {n0!r} differ; please "
                                   "report this as a wsi-ssl bug.")


def _probe_runs(r) -> np.ndarray:
    """Per-run AUC of a probe result (a run: a few-shot split, or one repeat of the CV)."""
    v = np.asarray(r.auc_runs, np.float64)
    return np.nanmean(v.reshape(r.repeats, -1), axis=1)


def _scores_and_differences(names, probes, survs):
    scores: list[CompareScore] = []
    diffs: list[PairedDifference] = []
    first_probe = next((p for p in probes if p is not None), None)
    settings = [] if first_probe is None else [r.name for r in first_probe.results]
    for k, setting in enumerate(settings):
        rows = [p.results[k] for p in probes]
        for n, r in zip(names, rows, strict=True):
            scores.append(CompareScore(setting, "AUC", n, r.auc_mean, *r.auc_ci,
                                       r.auc_p_value, r.runs))
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                diffs.append(_paired(setting, "AUC", names[i], names[j],
                                     _probe_runs(rows[i]) - _probe_runs(rows[j]),
                                     np.asarray(rows[i].auc_boot) - np.asarray(rows[j].auc_boot)))
    if survs and survs[0] is not None:
        for n, s in zip(names, survs, strict=True):
            scores.append(CompareScore("survival", "C-index", n, s.c_index_mean, *s.c_index_ci,
                                       s.c_index_p_value, len(s.folds)))
        runs = [np.nanmean(np.reshape([f.c_index for f in s.folds], (s.repeats, -1)), axis=1)
                for s in survs]
        for i in range(len(names)):
            for j in range(i + 1, len(names)):
                diffs.append(_paired("survival", "C-index", names[i], names[j],
                                     runs[i] - runs[j],
                                     np.asarray(survs[i].c_index_boot)
                                     - np.asarray(survs[j].c_index_boot)))
    return scores, diffs


def _paired(setting, metric, a, b, runs, boot) -> PairedDifference:
    ci = refit_interval(runs, boot, null=0.0, bounds=(-1.0, 1.0))
    return PairedDifference(setting, metric, a, b, ci.estimate, ci.low, ci.high, ci.p_value,
                            ci.n_boot)
