"""Reading and checking the inputs of the evaluations: embeddings, label and clinical tables.

Every check on a label/clinical table raises :class:`~wsi_ssl.errors.LabelError` with the table,
the column, the offending ids (the first few and the count) and what to do about it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, Union

import numpy as np

from wsi_ssl._utils import sanitize_id
from wsi_ssl.errors import ConfigError, InputError, LabelError
from wsi_ssl.store import SlideEmbeddings, load_embeddings

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "EmbeddingsLike",
    "TableLike",
    "Cohort",
    "as_embeddings",
    "read_table",
    "align",
    "patient_ids",
    "patient_level",
    "strip_slide_extension",
    "few",
    "single_threaded",
    "Level",
]

logger = logging.getLogger(__name__)

EmbeddingsLike = Union["SlideEmbeddings", "pd.DataFrame", str, os.PathLike]
TableLike = Union["pd.DataFrame", str, os.PathLike]
#: Unit of one row of an evaluation: a slide, or a patient (mean of the patient's slides).
Level = Literal["slide", "patient"]

#: Slide file extensions stripped from table ids when ids do not match the embeddings as given
#: (the embeddings are keyed by the file stem); longest first so ``.ome.tiff`` beats ``.tiff``.
_SLIDE_EXTS: tuple[str, ...] = tuple(sorted(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
     ".dcm", ".jp2", ".ome.tif", ".ome.tiff", ".qptiff", ".czi", ".isyntax", ".zvi", ".kfb",
     ".sdpc", ".h5", ".pt", ".npz"}, key=len, reverse=True))

#: A TCGA barcode: the first 12 characters (``TCGA-XX-XXXX``) name the patient.
_TCGA = re.compile(r"^TCGA-[A-Za-z0-9]{2}-[A-Za-z0-9]{4}")


_F = TypeVar("_F", bound=Callable)


def single_threaded(func: _F) -> _F:
    """Run ``func`` with BLAS/OpenMP pools limited to one thread (threadpoolctl, a scikit-learn
    dependency). The fits here are many small problems: on a busy 2-core machine a threaded
    BLAS made each logistic-regression fit 5-15x slower than one thread."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        # load the BLAS-linked modules first: threadpoolctl only limits libraries already loaded
        import scipy.linalg  # noqa: F401  # lazy: scipy loads on first use, not on import
        import scipy.optimize  # noqa: F401  # lazy: scipy loads on first use, not on import
        import sklearn.linear_model  # noqa: F401  # lazy: scikit-learn loads on the first fit, not on import
        from threadpoolctl import threadpool_limits  # lazy: threadpoolctl around BLAS

        with threadpool_limits(limits=1):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def few(items: list, k: int = 5) -> str:
    """``"['a', 'b', 'c', ...] (12 in all)"``: the first few items and the count."""
    head = ", ".join(repr(str(x)) for x in items[:k])
    more = ", ..." if len(items) > k else ""
    return f"[{head}{more}] ({len(items)} in all)"


def strip_slide_extension(slide_id: str) -> str:
    """``"TCGA-...-DX1.F6E9A5DF.svs"`` -> ``"TCGA-...-DX1.F6E9A5DF"``: drop one known slide (or
    feature-file) extension, case-insensitively; other ids are returned unchanged."""
    low = slide_id.lower()
    for ext in _SLIDE_EXTS:
        if low.endswith(ext) and len(slide_id) > len(ext):
            return slide_id[: -len(ext)]
    return slide_id


_TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".pq")


def _read_frame(path: Path, name: str, what: str) -> pd.DataFrame:
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv", ".txt"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    raise LabelError(f"{what} table {name}: unknown file type {suffix!r}; use .csv, .tsv or .parquet.")


def _frame_embeddings(df: pd.DataFrame, name: str, *, id_col: str | None,
                      feature_cols: Sequence[str] | None,
                      reserved: Mapping[str, str]) -> SlideEmbeddings:
    """Slide embeddings from a table of ids + numbers: the feature columns are ``feature_cols``
    or every numeric column other than the id column; none of them may be a column the
    evaluation reads from the label/clinical table (``reserved``: column -> role)."""
    if id_col is not None and id_col in df.columns:
        df = df.set_index(id_col)
    elif id_col is not None and df.index.name != id_col:
        raise InputError(
            f"embedding table {name} has no id column {id_col!r}; columns are "
            f"{list(map(str, df.columns))[:8]}; pass embedding_id_col= (--embedding-id-col)."
        )
    if feature_cols is not None:
        cols = [str(c) for c in feature_cols]
        missing = [c for c in cols if c not in df.columns]
        if not cols or missing:
            raise InputError(
                f"embedding table {name} has no feature columns {few(missing or cols)}; columns "
                f"are {list(map(str, df.columns))[:8]}; fix feature_cols= (--feature-cols)."
            )
        values = df[cols]
        non_numeric = [c for c in cols if not np.issubdtype(values[c].dtype, np.number)]
        if non_numeric:
            raise InputError(
                f"feature columns {few(non_numeric)} of embedding table {name} are not numeric; "
                "list only numeric columns in feature_cols= (--feature-cols)."
            )
    else:
        values = df.select_dtypes(include="number")
    clash = [f"{c!r} (the {reserved[str(c)]} column)" for c in values.columns
             if str(c) in reserved]
    if clash:
        raise InputError(
            f"embedding table {name} would use {', '.join(clash)} as a feature: an outcome or "
            "id must never be a feature; drop it from the embedding table or name the feature "
            "columns with feature_cols= (--feature-cols)."
        )
    if values.shape[1] == 0:
        raise InputError(f"the embedding table {name} has no numeric feature columns.")
    return SlideEmbeddings(tuple(str(s) for s in df.index), values.to_numpy(np.float32),
                           {"source": name.strip("'"),
                            "feature_cols": [str(c) for c in values.columns]})


def as_embeddings(embeddings: EmbeddingsLike, *, id_col: str | None = None,
                  feature_cols: Sequence[str] | None = None,
                  reserved: Mapping[str, str] | None = None) -> SlideEmbeddings:
    """Coerce a :class:`SlideEmbeddings`, a DataFrame of embeddings or a file path.

    A DataFrame uses its index as slide ids (or ``id_col`` when it is a column); a CSV/TSV/parquet
    table uses ``id_col`` or its first column. Their feature columns are ``feature_cols``, or else
    every numeric column other than the id. ``reserved`` maps the columns the evaluation reads
    from the label/clinical table (label, time, event, patient) to their role: such a column in
    an embedding table is an :class:`~wsi_ssl.errors.InputError`, never a feature.
    ``.npz`` files go through :func:`wsi_ssl.store.load_embeddings`.
    """
    reserved = dict(reserved or {})
    if isinstance(embeddings, SlideEmbeddings):
        emb = embeddings
    elif isinstance(embeddings, (str, os.PathLike)):
        path = Path(embeddings)
        if path.suffix.lower() not in _TABLE_SUFFIXES or not path.exists():
            emb = load_embeddings(path, id_col=id_col)  # .npz, and the errors for other files
        else:
            df = _read_frame(path, f"'{path}'", "embedding")
            emb = _frame_embeddings(df, f"'{path}'", id_col=id_col or str(df.columns[0]),
                                    feature_cols=feature_cols, reserved=reserved)
    else:
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        if not isinstance(embeddings, pd.DataFrame):
            raise InputError(
                f"embeddings must be SlideEmbeddings, a DataFrame indexed by slide id or a path "
                f"(.npz/.csv/.tsv/.parquet); got {type(embeddings).__name__}."
            )
        emb = _frame_embeddings(embeddings, "(DataFrame)",
                                id_col=id_col if id_col in embeddings.columns else None,
                                feature_cols=feature_cols, reserved=reserved)
        emb = SlideEmbeddings(emb.slide_ids, emb.embeddings,
                              {**emb.provenance, "source": "DataFrame"})
    x = np.asarray(emb.embeddings)
    if len(emb) == 0:
        raise InputError("the embeddings are empty (0 slides).")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        ids = [s for s, b in zip(emb.slide_ids, bad, strict=True) if b]
        raise InputError(
            f"embeddings contain NaN/inf for slides {few(ids)}; re-embed them or leave them out "
            "(SlideEmbeddings.subset)."
        )
    return emb


def read_table(table: TableLike, *, id_col: str, what: str = "labels") -> tuple[pd.DataFrame, str]:
    """Read a label/clinical table (DataFrame, .csv, .tsv, .parquet) into a DataFrame whose column
    ``id_col`` holds slide ids as strings; returns it with a name for messages."""
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    if isinstance(table, pd.DataFrame):
        df, name = table.copy(), "(DataFrame)"
    elif isinstance(table, (str, os.PathLike)):
        path = Path(table)
        name = f"'{path}'"
        if not path.exists():
            raise LabelError(f"{what} table {name} does not exist; pass a CSV/TSV/parquet file.")
        df = _read_frame(path, name, what)
    else:
        raise LabelError(
            f"{what} must be a DataFrame or a CSV/TSV/parquet path; got {type(table).__name__}."
        )
    if id_col not in df.columns:
        if df.index.name == id_col:
            df = df.reset_index()
        else:
            raise LabelError(
                f"{what} table {name} has no id column {id_col!r}; columns are "
                f"{list(map(str, df.columns))[:10]}; pass id_col= (--id-col) naming the slide ids."
            )
    ids = df[id_col]
    empty = ids.isna() | (ids.astype(str).str.strip() == "")
    if empty.any():
        rows = [int(i) for i in np.flatnonzero(empty.to_numpy())]
        raise LabelError(
            f"{what} table {name} has missing slide ids in column {id_col!r} at rows {few(rows)}; "
            "fill them in or drop those rows."
        )
    df[id_col] = ids.astype(str).str.strip()
    dup = df[id_col][df[id_col].duplicated()].unique().tolist()
    if dup:
        raise LabelError(
            f"{what} table {name} has duplicated slide ids in {id_col!r}: {few(dup)}; keep one row "
            "per slide."
        )
    return df.reset_index(drop=True), name


def align(emb: SlideEmbeddings, df: pd.DataFrame, *, id_col: str, name: str,
          what: str = "labels") -> np.ndarray:
    """Rows of ``emb.embeddings`` for the ids of ``df`` (in table order).

    Ids are matched exactly; when some do not match, both sides are matched again with a known
    slide extension stripped (``TCGA-...-DX1.F6E9A5DF.svs`` -> the stem the embeddings are keyed
    by) and sanitised like :func:`wsi_ssl._utils.sanitize_id`, with one log line saying so.
    Ids that still do not match are a :class:`LabelError`; embedded slides without a row in the
    table are left out with a log message.
    """
    index = {s: i for i, s in enumerate(emb.slide_ids)}
    ids = df[id_col].tolist()
    rows = [index.get(s) for s in ids]
    if any(r is None for r in rows):
        def key(s: str) -> str:
            return sanitize_id(strip_slide_extension(s))

        loose: dict[str, int | None] = {}
        for s, i in index.items():
            loose[key(s)] = None if key(s) in loose else i  # ambiguous keys match nothing
        matched = [r if r is not None else loose.get(key(s)) for s, r in zip(ids, rows, strict=True)]
        hits = [(s, m) for s, m, r in zip(ids, matched, rows, strict=True)
                if r is None and m is not None]
        if hits:
            logger.info("%s table %s: %d of %d slide ids matched the embeddings with the slide "
                        "file extension stripped (e.g. %r -> %r).", what, name, len(hits),
                        len(ids), hits[0][0], emb.slide_ids[hits[0][1]])
        rows = matched
    unknown = [s for s, r in zip(ids, rows, strict=True) if r is None]
    if unknown:
        raise LabelError(
            f"{what} table {name} has slide ids that are not in the embeddings: {few(unknown)}; "
            f"embed those slides or drop their rows (ids must match, up to a slide file "
            f"extension; embeddings have e.g. {few(list(emb.slide_ids), 3)})."
        )
    left = len(emb) - len(ids)
    if left:
        logger.info("%d embedded slides have no row in %s and are left out.", left, name)
    return np.asarray(emb.embeddings, dtype=np.float64)[rows]


def patient_ids(df: pd.DataFrame, *, id_col: str, patient_col: str | None,
                groups: Literal["patient"] | None) -> np.ndarray:
    """One patient id per row: ``patient_col`` when the table has it, else the TCGA barcode
    prefix (first 12 characters, ``TCGA-XX-XXXX``) for TCGA ids, else the slide id itself.
    ``groups=None`` treats every slide as its own patient."""
    if groups not in ("patient", None):
        raise ConfigError(f"groups={groups!r} is not supported; use 'patient' or None.")
    ids = df[id_col].astype(str)
    if groups is None:
        return ids.to_numpy(dtype=object)
    if patient_col and patient_col in df.columns:
        col = df[patient_col]
        if col.isna().any():
            bad = ids[col.isna()].tolist()
            raise LabelError(
                f"column {patient_col!r} has no patient id for slides {few(bad)}; fill it in."
            )
        return col.astype(str).to_numpy(dtype=object)
    return np.asarray([m.group(0) if (m := _TCGA.match(s)) else s for s in ids], dtype=object)


def patient_level(x: np.ndarray, patients: np.ndarray, outcomes: Mapping[str, np.ndarray], *,
                  name: str, id_col: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray],
                                                   np.ndarray]:
    """One row per patient: the mean of the patient's slide embeddings, and the patient's
    outcome values, which must be the same on every slide of the patient.

    Args:
        x: ``(n_slides, d)`` embeddings; patients: ``(n_slides,)`` patient ids.
        outcomes: column name -> ``(n_slides,)`` values (label, time, event).

    Returns:
        ``(x_p, patient_ids, outcomes_p, n_slides_per_patient)``, patients in order of first
        appearance.

    Raises:
        LabelError: a patient whose slides disagree on an outcome column.
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    codes, uniq = pd.factorize(pd.Series(patients, dtype=object))
    counts = np.bincount(codes, minlength=len(uniq))
    x_p = np.zeros((len(uniq), x.shape[1]))
    np.add.at(x_p, codes, x)
    x_p /= counts[:, None]
    _, first = np.unique(codes, return_index=True)  # first slide of each patient
    out = {}
    for col, values in outcomes.items():
        values = np.asarray(values)
        differs = values != values[first][codes]
        if differs.any():
            bad = sorted({str(uniq[c]) for c in codes[differs]})
            raise LabelError(
                f"table {name}: patients {few(bad)} have slides with different {col!r} values, "
                f"so level='patient' (--level patient) cannot give them one row; fix the table, "
                f"or evaluate per slide (level='slide'); slide ids are in {id_col!r}."
            )
        out[col] = values[first]
    return x_p, np.asarray(uniq, dtype=object), out, counts


@dataclass(frozen=True)
class Cohort:
    """The aligned inputs of one evaluation (internal).

    Shape:
        x: ``(n, d)`` float64 embeddings in table order.
    """

    slide_ids: tuple[str, ...]
    patients: np.ndarray
    x: np.ndarray
    source: str
