"""Slides like this one: cosine nearest neighbours over slide embeddings, and retrieval figures.

``similar`` finds the ``k`` most similar slides of each query (scikit-learn ``NearestNeighbors``
with the cosine metric, or FAISS inner product on L2-normalised rows when ``faiss`` is installed
and the cohort is large), leaving out slides of the query's own patient by default.

``retrieval_report`` is the standard slide-retrieval evaluation (e.g. Yottixel, RetCCL): every
labelled slide is a query against all the others (its patient's slides excluded);
**majority-vote accuracy at top-k** (the most frequent label among the k nearest; ties go to the
label of the nearer slide) for k = 1, 3, 5 and **mAP@5** (average precision of the top 5, a
neighbour being relevant when it has the query's label), each with a patient-bootstrap 95 %
interval.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl.errors import BackendUnavailableError, ConfigError, InputError
from wsi_ssl.eval._inputs import (
    EmbeddingsLike,
    TableLike,
    align,
    as_embeddings,
    few,
    patient_ids,
    read_table,
)
from wsi_ssl.eval._report_io import dumps, write_report
from wsi_ssl.eval._stats import cluster_bootstrap_weights, percentile_ci

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = ["SimilarResult", "RetrievalReport", "similar", "retrieval_report", "plot_retrieval"]

logger = logging.getLogger(__name__)

Backend = Literal["auto", "sklearn", "faiss"]
_FAISS_MIN = 50_000  # slides from which "auto" prefers FAISS


@dataclass(frozen=True, kw_only=True)
class SimilarResult:
    """The nearest slides of each query.

    Attributes:
        query_ids: the ``Q`` query slides.
        neighbor_ids: ``(Q, k)`` ids of the nearest slides, nearest first ("" where fewer than
            ``k`` slides were eligible).
        similarity: ``(Q, k)`` cosine similarities (NaN where no neighbour).
        excluded: ``"patient"`` (slides of the query's patient left out) or ``"self"``.
        backend: ``"sklearn"`` or ``"faiss"``.
    """

    query_ids: tuple[str, ...]
    neighbor_ids: np.ndarray
    similarity: np.ndarray
    excluded: str
    backend: str

    def to_frame(self) -> pd.DataFrame:
        """One row per (query, rank): ``query_id, rank, slide_id, similarity``."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        q, k = self.neighbor_ids.shape
        df = pd.DataFrame({"query_id": np.repeat(self.query_ids, k),
                           "rank": np.tile(np.arange(1, k + 1), q),
                           "slide_id": self.neighbor_ids.ravel(),
                           "similarity": self.similarity.ravel()})
        return df[df["slide_id"] != ""].reset_index(drop=True)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _faiss_available() -> bool:

    return importlib.util.find_spec("faiss") is not None


def _search(x: np.ndarray, queries: np.ndarray, n: int, backend: Backend
            ) -> tuple[np.ndarray, np.ndarray, str]:
    """``n`` nearest rows of ``x`` for each row of ``queries`` (both L2-normalised), cosine."""
    if backend not in ("auto", "sklearn", "faiss"):
        raise ConfigError(f"backend={backend!r} must be 'auto', 'sklearn' or 'faiss'.")
    use_faiss = backend == "faiss" or (backend == "auto" and len(x) >= _FAISS_MIN
                                        and _faiss_available())
    if use_faiss:
        try:
            import faiss  # lazy: optional: faiss only when installed and asked for
        except ImportError as err:
            raise BackendUnavailableError("backend='faiss' needs FAISS: pip install faiss-cpu "
                                          "(or use backend='sklearn').") from err
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(np.ascontiguousarray(x, np.float32))
        sim, idx = index.search(np.ascontiguousarray(queries, np.float32), n)
        return idx.astype(np.int64), sim.astype(np.float64), "faiss"
    from sklearn.neighbors import NearestNeighbors  # lazy: scikit-learn on first use

    nn = NearestNeighbors(n_neighbors=n, metric="cosine", algorithm="brute").fit(x)
    dist, idx = nn.kneighbors(queries)
    return idx, 1.0 - dist, "sklearn"


def _neighbours(x: np.ndarray, patients: np.ndarray, rows: np.ndarray, k: int,
                exclude_patient: bool, backend: Backend
                ) -> tuple[np.ndarray, np.ndarray, str]:
    """``(Q, k)`` neighbour rows (-1 = none) and similarities for query ``rows`` of ``x``."""
    x = _normalise(x)
    if exclude_patient:
        _, counts = np.unique(patients, return_counts=True)
        extra = int(counts.max())
    else:
        extra = 1
    n = min(len(x), k + extra)
    idx, sim, used = _search(x, x[rows], n, backend)
    out_i = np.full((len(rows), k), -1, np.int64)
    out_s = np.full((len(rows), k), np.nan)
    for q, r in enumerate(rows):
        keep = [j for j in range(n) if idx[q, j] != r and idx[q, j] >= 0
                and not (exclude_patient and patients[idx[q, j]] == patients[r])][:k]
        out_i[q, :len(keep)] = idx[q, keep]
        out_s[q, :len(keep)] = sim[q, keep]
    return out_i, out_s, used


def similar(embeddings: EmbeddingsLike, query_ids: Sequence[str] | str | None = None,
            k: int = 5, *, patients: Mapping[str, str] | TableLike | None = None,
            id_col: str = "slide_id", patient_col: str = "patient_id",
            exclude_same_patient: bool = True, backend: Backend = "auto") -> SimilarResult:
    """The ``k`` slides most similar to each query (cosine similarity of slide embeddings).

    Args:
        embeddings: :class:`~wsi_ssl.store.SlideEmbeddings`, a DataFrame indexed by slide id or
            an ``.npz`` / ``.csv`` / ``.parquet`` path.
        query_ids: slides to query (default: every slide).
        k: neighbours per query.
        patients: slide id -> patient id, as a mapping or a table with ``id_col`` and
            ``patient_col``; without it, TCGA barcodes give the patient (first 12 characters)
            and any other id is its own patient.
        exclude_same_patient: leave out the query's own patient's slides (else only itself).
        backend: ``"auto"`` (FAISS when installed and the cohort has 50k+ slides, else
            scikit-learn), ``"sklearn"`` or ``"faiss"``.

    Returns:
        A :class:`SimilarResult`.

    Raises:
        InputError: unknown query ids (named), NaN embeddings.
    """
    emb = as_embeddings(embeddings)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k={k!r} must be an integer >= 1.")
    ids = list(emb.slide_ids)
    queries = [query_ids] if isinstance(query_ids, str) else list(query_ids or ids)
    index = {s: i for i, s in enumerate(ids)}
    unknown = [q for q in queries if q not in index]
    if unknown:
        raise InputError(f"query ids {few(unknown)} are not in the embeddings (which have e.g. "
                         f"{few(ids, 3)}).")
    pat = _patients_of(ids, patients, id_col=id_col, patient_col=patient_col)
    rows = np.array([index[q] for q in queries], np.int64)
    nb, sim, used = _neighbours(np.asarray(emb.embeddings), pat, rows, int(k),
                                exclude_same_patient, backend)
    names = np.asarray(ids + [""], dtype=object)[nb]  # -1 -> ""
    return SimilarResult(query_ids=tuple(queries), neighbor_ids=names, similarity=sim,
                         excluded="patient" if exclude_same_patient else "self", backend=used)


def _patients_of(ids: list[str], patients: Any, *, id_col: str, patient_col: str) -> np.ndarray:
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    frame = pd.DataFrame({id_col: ids})
    if patients is None:
        return patient_ids(frame, id_col=id_col, patient_col=None, groups="patient")
    if isinstance(patients, Mapping):
        return np.asarray([str(patients.get(s, s)) for s in ids], dtype=object)
    df, _ = read_table(patients, id_col=id_col, what="patient")
    if patient_col not in df.columns:
        return patient_ids(frame, id_col=id_col, patient_col=None, groups="patient")
    m = dict(zip(df[id_col], df[patient_col].astype(str), strict=True))
    return np.asarray([m.get(s, s) for s in ids], dtype=object)


# -- the retrieval report ----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RetrievalReport:
    """Retrieval figures of one set of slide embeddings against slide labels.

    Attributes:
        metrics: ``{name: {"value", "ci_low", "ci_high"}}`` for ``acc@k`` (majority vote) and
            ``mAP@5``.
        per_query: one row per query: ``slide_id, patient_id, label, predicted@k..., ap@5``.
        n_slides, n_patients: the labelled slides and patients used as queries.
        classes: the labels.
        chance: majority-vote accuracy of always answering the most frequent label.
        settings: the parameters (k values, exclusion, bootstrap, seed, source).
    """

    metrics: dict[str, dict[str, float]]
    per_query: Any  # pandas.DataFrame
    n_slides: int
    n_patients: int
    classes: tuple[str, ...]
    chance: float
    settings: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """One row per metric: ``metric, value, ci_low, ci_high``."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        return pd.DataFrame([{"metric": m, **v} for m, v in self.metrics.items()])

    def to_json(self) -> str:
        return dumps({"metrics": self.metrics, "n_slides": self.n_slides,
                      "n_patients": self.n_patients, "classes": list(self.classes),
                      "chance": self.chance, "settings": self.settings})

    def plot(self, label: str = "embeddings"):
        """Bar chart of the figures with their 95 % intervals."""
        return plot_retrieval({label: self})

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``retrieval.json``, ``retrieval.png``, ``retrieval.csv`` and
        ``retrieval_queries.csv`` into ``out_dir``."""
        fig = self.plot(str(self.settings.get("source", "embeddings")))
        return write_report(out_dir, "retrieval", json_text=self.to_json(), fig=fig,
                            frame=self.to_frame(), extra={"queries": self.per_query})


def _majority(labels: np.ndarray) -> Any:
    """Most frequent label; ties go to the one seen first (the nearer neighbour)."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    best = np.flatnonzero(counts == counts.max())
    return values[best[np.argmin(first[best])]]


def _hits(yn: np.ndarray, y: np.ndarray, ks: tuple[int, ...], map_k: int,
          table: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per query: 1/0 majority-vote hit at each k and the average precision at ``map_k``, from
    the neighbours' labels ``yn`` (None: no neighbour); the predictions and APs go to
    ``table``."""
    hits: dict[str, np.ndarray] = {}
    for k in ks:
        pred = [_majority(np.asarray([v for v in row[:k] if v is not None], dtype=object))
                if any(v is not None for v in row[:k]) else None for row in yn]
        table[f"predicted@{k}"] = pred
        hits[f"acc@{k}"] = np.array([p == t for p, t in zip(pred, y, strict=True)], float)
    rel = (yn[:, :map_k] == y[:, None]).astype(float)
    prec = np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)
    ap = np.where(rel.sum(1) > 0, (prec * rel).sum(1) / np.maximum(rel.sum(1), 1), 0.0)
    hits[f"mAP@{map_k}"] = ap
    table[f"ap@{map_k}"] = ap
    return hits


def _with_intervals(hits: dict[str, np.ndarray], pats: np.ndarray, n_bootstrap: int,
                    seed: int) -> dict[str, dict[str, float]]:
    """The mean of each metric with its patient-bootstrap 95 % interval (NaN without)."""
    rng = np.random.default_rng(seed)
    w = cluster_bootstrap_weights(pats, n_bootstrap, rng) if n_bootstrap else None
    metrics = {}
    for m, v in hits.items():
        lo = hi = float("nan")
        if w is not None:
            boot = (w @ v) / np.maximum(w.sum(1), 1e-12)
            lo, hi = percentile_ci(boot)
        metrics[m] = {"value": float(v.mean()), "ci_low": lo, "ci_high": hi}
    return metrics


def retrieval_report(embeddings: EmbeddingsLike, labels: TableLike, *, label_col: str = "label",
                     id_col: str = "slide_id", patient_col: str | None = "patient_id",
                     ks: Sequence[int] = (1, 3, 5), map_k: int = 5,
                     exclude_same_patient: bool = True, n_bootstrap: int = 1000,
                     backend: Backend = "auto", seed: int = 0,
                     embedding_id_col: str | None = None) -> RetrievalReport:
    """Leave-one-patient-out retrieval: majority-vote accuracy @k and mAP@``map_k``.

    Args:
        embeddings: slide embeddings (see :func:`similar`).
        labels: table with ``id_col``, ``label_col`` (and ``patient_col`` if present); only
            its slides are queries and candidates.
        ks: the k of the majority-vote accuracies.
        map_k: the cut-off of the mean average precision.
        exclude_same_patient: never retrieve a slide of the query's patient.
        n_bootstrap: patient-bootstrap resamples for the 95 % intervals (0 = none).
        seed: seeds the bootstrap.

    Returns:
        A :class:`RetrievalReport` (``save(out_dir)`` writes JSON, PNG and CSVs).
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    ks = tuple(int(v) for v in ks)
    if not ks or min(ks) < 1 or int(map_k) < 1:
        raise ConfigError(f"ks={ks!r} and map_k={map_k!r} must be integers >= 1.")
    emb = as_embeddings(embeddings, id_col=embedding_id_col)
    df, name = read_table(labels, id_col=id_col)
    if label_col not in df.columns:
        raise InputError(f"labels table {name} has no column {label_col!r}; columns are "
                         f"{list(map(str, df.columns))[:10]} (pass label_col= / --label-col).")
    df = df[df[label_col].notna()].reset_index(drop=True)
    if len(df) < 3:
        raise InputError(f"labels table {name} has {len(df)} labelled slides; retrieval needs "
                         "at least 3.")
    x = align(emb, df, id_col=id_col, name=name)
    pats = patient_ids(df, id_col=id_col, patient_col=patient_col, groups="patient")
    y = df[label_col].astype(str).to_numpy(dtype=object)
    k_max = max(max(ks), int(map_k))
    nb, _sim, used = _neighbours(x, pats, np.arange(len(df)), k_max, exclude_same_patient,
                                 backend)
    if (nb < 0).any():
        logger.warning("%d queries have fewer than %d eligible neighbours",
                       int((nb < 0).any(1).sum()), k_max)
    yn = np.where(nb >= 0, np.asarray(list(y) + [None], dtype=object)[nb], None)
    table: dict[str, Any] = {"slide_id": df[id_col], "patient_id": pats, "label": y}
    hits = _hits(yn, y, ks, int(map_k), table)
    metrics = _with_intervals(hits, pats, int(n_bootstrap), seed)
    classes, counts = np.unique(y.astype(str), return_counts=True)
    settings = {"ks": list(ks), "map_k": int(map_k), "exclude_same_patient": exclude_same_patient,
                "n_bootstrap": int(n_bootstrap), "seed": int(seed), "backend": used,
                "label_col": label_col,
                "source": str(emb.provenance.get("method") or emb.provenance.get("source", ""))}
    return RetrievalReport(metrics=metrics, per_query=pd.DataFrame(table), n_slides=len(df),
                           n_patients=len(set(pats)), classes=tuple(str(c) for c in classes),
                           chance=float(counts.max() / counts.sum()), settings=settings)


def plot_retrieval(reports: Mapping[str, RetrievalReport]):
    """Grouped bars (one group per metric, one bar per embedding) with 95 % intervals.

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib only when a figure is drawn

    if not reports:
        raise InputError("plot_retrieval needs at least one RetrievalReport.")
    first = next(iter(reports.values()))
    names = list(first.metrics)
    fig = Figure(figsize=(6.5, 3.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(reports)
    for j, (label, rep) in enumerate(reports.items()):
        vals = np.array([rep.metrics[m]["value"] for m in names])
        lo = np.array([rep.metrics[m]["ci_low"] for m in names])
        hi = np.array([rep.metrics[m]["ci_high"] for m in names])
        err = np.vstack([np.nan_to_num(vals - lo), np.nan_to_num(hi - vals)])
        pos = np.arange(len(names)) + (j - (len(reports) - 1) / 2) * width
        ax.bar(pos, vals, width, yerr=err, capsize=3, label=label)
    ax.axhline(first.chance, color="grey", ls=":", lw=1, label="majority class")
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score (95 % patient-bootstrap CI)")
    excl = "other patients only" if first.settings.get("exclude_same_patient") else "self excluded"
    ax.set_title(f"Slide retrieval: {first.n_slides} queries, {excl}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig

