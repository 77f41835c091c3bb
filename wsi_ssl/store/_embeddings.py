"""Slide embeddings: one small matrix of floats per cohort, with ids and provenance.

Saved as ``.npz`` (``ids``, ``embeddings``, ``provenance`` JSON) — the compact artefact the whole
pipeline exists to produce — and loadable from CSV/TSV/parquet tables of other tools (first
column or ``id_col`` = slide id, the remaining numeric columns = the embedding).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl.errors import InputError, StoreFormatError
from wsi_ssl.store._anndata import embeddings_to_anndata

__all__ = ["SlideEmbeddings", "load_embeddings"]


@dataclass(frozen=True)
class SlideEmbeddings:
    """Slide ids with their embedding matrix.

    Attributes:
        slide_ids: ``n`` unique slide ids, in the row order of ``embeddings``.
        embeddings: ``(n, d)`` float16 or float32.
        provenance: JSON-serialisable dict (store fingerprint, model config, package version...).
    """

    slide_ids: tuple[str, ...]
    embeddings: np.ndarray
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = tuple(str(s) for s in self.slide_ids)
        object.__setattr__(self, "slide_ids", ids)
        emb = np.asarray(self.embeddings)
        if emb.ndim != 2 or emb.shape[0] != len(ids):
            raise InputError(
                f"embeddings must be (n_slides, dim) with n_slides={len(ids)}; got shape {emb.shape}."
            )
        if not np.issubdtype(emb.dtype, np.floating):
            emb = emb.astype(np.float32)
        if len(set(ids)) != len(ids):
            dup = sorted({s for s in ids if ids.count(s) > 1})
            raise InputError(f"duplicated slide ids in embeddings: {dup[:5]} ({len(dup)} in all).")
        object.__setattr__(self, "embeddings", emb)

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def nbytes_per_slide(self) -> float:
        """Bytes of embedding per slide (the compression figure: 512 float16 = 1 KiB)."""
        return self.embeddings.nbytes / max(1, len(self))

    def subset(self, slide_ids: Sequence[str]) -> SlideEmbeddings:
        """Rows for ``slide_ids`` in that order; unknown ids are an :class:`InputError`."""
        index = {s: i for i, s in enumerate(self.slide_ids)}
        missing = [s for s in slide_ids if s not in index]
        if missing:
            raise InputError(
                f"{len(missing)} slide ids are not in the embeddings, e.g. {missing[:5]}."
            )
        rows = [index[s] for s in slide_ids]
        return SlideEmbeddings(tuple(slide_ids), self.embeddings[rows], dict(self.provenance))

    def to_pandas(self):
        """A DataFrame indexed by ``slide_id`` with columns ``e0 .. e{d-1}``."""
        import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

        cols = [f"e{i}" for i in range(self.dim)]
        df = pd.DataFrame(self.embeddings.astype(np.float32), columns=cols,
                          index=pd.Index(self.slide_ids, name="slide_id"))
        return df

    def to_anndata(self, labels: Any = None, *, id_col: str = "slide_id") -> Any:
        """One observation per slide as an ``anndata.AnnData`` (``pip install
        "wsi-ssl[anndata]"``): ``X`` the embeddings, ``obs`` indexed by slide id and joined with
        ``labels`` (a DataFrame or .csv/.tsv/.parquet with ``id_col``), ``uns["wsi_ssl"]`` the
        provenance. See :func:`wsi_ssl.store.embeddings_to_anndata`."""
        return embeddings_to_anndata(self, labels, id_col=id_col)

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (atomically: a temporary file then rename) and return its path."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            ids=np.asarray(self.slide_ids, dtype=np.str_),
            embeddings=self.embeddings,
            provenance=np.asarray(json.dumps(self.provenance, default=str)),
        )
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, id_col: str | None = None) -> SlideEmbeddings:
        """Read our ``.npz`` or a CSV/TSV/parquet table (ids in ``id_col`` or the first column)."""
        return load_embeddings(path, id_col=id_col)


def load_embeddings(path: str | os.PathLike, *, id_col: str | None = None) -> SlideEmbeddings:
    """Load slide embeddings from ``.npz`` (ours), ``.csv``, ``.tsv`` or ``.parquet``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"embedding file '{path}' does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                if "ids" not in z or "embeddings" not in z:
                    raise StoreFormatError(
                        f"'{path}' is an .npz without 'ids' and 'embeddings' arrays; "
                        "write it with SlideEmbeddings.save or `wsi-ssl encode-slides`."
                    )
                prov = json.loads(str(z["provenance"])) if "provenance" in z else {}
                return SlideEmbeddings(tuple(z["ids"].tolist()), z["embeddings"], prov)
        except (OSError, ValueError) as err:
            if isinstance(err, StoreFormatError):
                raise
            raise StoreFormatError(f"cannot read embeddings from '{path}': {err}") from err
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    if suffix in (".csv", ".tsv", ".txt"):
        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        raise InputError(
            f"'{path}': unknown embedding file type {suffix!r}; use .npz, .csv, .tsv or .parquet."
        )
    col = id_col or df.columns[0]
    if col not in df.columns:
        raise InputError(f"'{path}' has no id column {col!r}; columns are {list(df.columns)[:8]}.")
    values = df.drop(columns=[col]).select_dtypes(include="number")
    if values.shape[1] == 0:
        raise InputError(f"'{path}' has no numeric embedding columns besides {col!r}.")
    return SlideEmbeddings(tuple(df[col].astype(str)), values.to_numpy(np.float32),
                           {"source": str(path)})
