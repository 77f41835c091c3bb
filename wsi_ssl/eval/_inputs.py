"""Reading and checking the inputs of the evaluations: embeddings, label and clinical tables.

Every check on a label/clinical table raises :class:`~wsi_ssl.errors.LabelError` with the table,
the column, the offending ids (the first few and the count) and what to do about it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, Union

import numpy as np

from wsi_ssl.errors import ConfigError, InputError, LabelError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from wsi_ssl.store import SlideEmbeddings

__all__ = [
    "EmbeddingsLike",
    "TableLike",
    "Cohort",
    "as_embeddings",
    "read_table",
    "align",
    "patient_ids",
    "few",
    "single_threaded",
]

logger = logging.getLogger(__name__)

EmbeddingsLike = Union["SlideEmbeddings", "pd.DataFrame", str, os.PathLike]
TableLike = Union["pd.DataFrame", str, os.PathLike]

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
        import scipy.linalg  # noqa: F401
        import scipy.optimize  # noqa: F401
        import sklearn.linear_model  # noqa: F401
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def few(items: list, k: int = 5) -> str:
    """``"['a', 'b', 'c', ...] (12 in all)"``: the first few items and the count."""
    head = ", ".join(repr(str(x)) for x in items[:k])
    more = ", ..." if len(items) > k else ""
    return f"[{head}{more}] ({len(items)} in all)"


def as_embeddings(embeddings: EmbeddingsLike, *, id_col: str | None = None) -> SlideEmbeddings:
    """Coerce a :class:`SlideEmbeddings`, a DataFrame indexed by slide id or a file path.

    A DataFrame uses its index as slide ids (or ``id_col`` when it is a column) and its numeric
    columns as the embedding; files go through :func:`wsi_ssl.store.load_embeddings`.
    """
    from wsi_ssl.store import SlideEmbeddings, load_embeddings

    if isinstance(embeddings, SlideEmbeddings):
        emb = embeddings
    elif isinstance(embeddings, (str, os.PathLike)):
        emb = load_embeddings(embeddings, id_col=id_col)
    else:
        import pandas as pd

        if not isinstance(embeddings, pd.DataFrame):
            raise InputError(
                f"embeddings must be SlideEmbeddings, a DataFrame indexed by slide id or a path "
                f"(.npz/.csv/.tsv/.parquet); got {type(embeddings).__name__}."
            )
        df = embeddings.set_index(id_col) if id_col and id_col in embeddings.columns else embeddings
        values = df.select_dtypes(include="number")
        if values.shape[1] == 0:
            raise InputError("the embeddings DataFrame has no numeric columns.")
        emb = SlideEmbeddings(tuple(str(s) for s in df.index), values.to_numpy(np.float32),
                              {"source": "DataFrame"})
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
    import pandas as pd

    if isinstance(table, pd.DataFrame):
        df, name = table.copy(), "(DataFrame)"
    elif isinstance(table, (str, os.PathLike)):
        path = Path(table)
        name = f"'{path}'"
        if not path.exists():
            raise LabelError(f"{what} table {name} does not exist; pass a CSV/TSV/parquet file.")
        suffix = path.suffix.lower()
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
        else:
            raise LabelError(
                f"{what} table {name}: unknown file type {suffix!r}; use .csv, .tsv or .parquet."
            )
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

    Ids of the table that are not in the embeddings are a :class:`LabelError`; embedded slides
    without a row in the table are left out with a log message.
    """
    index = {s: i for i, s in enumerate(emb.slide_ids)}
    ids = df[id_col].tolist()
    unknown = [s for s in ids if s not in index]
    if unknown:
        raise LabelError(
            f"{what} table {name} has slide ids that are not in the embeddings: {few(unknown)}; "
            f"embed those slides or drop their rows (ids must match exactly; embeddings have "
            f"e.g. {few(list(emb.slide_ids), 3)})."
        )
    left = len(emb) - len(ids)
    if left:
        logger.info("%d embedded slides have no row in %s and are left out.", left, name)
    return np.asarray(emb.embeddings, dtype=np.float64)[[index[s] for s in ids]]


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
