"""scverse export: a tile-store slide or a set of slide embeddings as :class:`anndata.AnnData`.

``anndata`` is an optional extra (``pip install "wsi-ssl[anndata]"``); it is imported only when a
conversion is asked for. Layout (the scanpy / squidpy conventions):

- tiles of one slide: ``X`` = tile features ``(n_tiles, D)`` float32, ``obs`` = ``slide_id``,
  ``x``, ``y`` (level-0 px), ``obsm["spatial"]`` = level-0 ``(x, y)`` top-left corners,
  ``uns["wsi_ssl"]`` = provenance (store, encoder, tile geometry, the slide's attributes as JSON);
- slide embeddings: ``X`` = ``(n_slides, dim)``, ``obs`` indexed by slide id and joined with a
  label table, ``uns["wsi_ssl"]`` = the embeddings' provenance (as JSON).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from wsi_ssl.errors import BackendUnavailableError, InputError

__all__ = ["tiles_to_anndata", "embeddings_to_anndata"]


def _anndata() -> Any:
    try:
        import anndata  # lazy: optional extra `anndata`
    except ImportError as err:
        raise BackendUnavailableError(
            "AnnData export needs the optional 'anndata' package: pip install "
            "\"wsi-ssl[anndata]\"") from err
    return anndata


def tiles_to_anndata(store: Any, slide_id: str) -> Any:
    """One slide of a tile store as an AnnData (one observation per tile).

    Args:
        store: a :class:`~wsi_ssl.store.TileStore` or its path.
        slide_id: a complete slide of the store.

    Returns:
        ``anndata.AnnData`` with ``X`` ``(N, D)`` float32 features, ``obsm["spatial"]`` ``(N, 2)``
        level-0 ``(x, y)``, ``obs`` (``slide_id``, ``x``, ``y``), ``uns["wsi_ssl"]`` provenance.

    Raises:
        BackendUnavailableError: ``anndata`` is not installed (the message says what to install).
        InputError: the slide is not in the store.
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    ad = _anndata()
    if isinstance(store, (str, os.PathLike)):
        from wsi_ssl.store._tilestore import TileStore  # lazy: `import wsi_ssl.store` stays light

        store = TileStore(store, mode="r")
    if slide_id not in store:
        raise InputError(f"slide_id={slide_id!r} is not a complete slide of tile store "
                         f"'{getattr(store, 'path', store)}' (e.g. {list(store.slide_ids)[:3]}).")
    if hasattr(store, "read_features"):  # a TileStore: features and coords only, not the bank
        feats = store.read_features(slide_id)
        coords = np.asarray(store.read_coords(slide_id), np.int64)
        attrs = dict(store.slide_attrs(slide_id) or {})
    else:
        rec = store[slide_id]
        feats, coords = rec.features, np.asarray(rec.coords, np.int64)
        attrs = dict(getattr(rec, "attrs", {}) or {})
    obs = pd.DataFrame({"slide_id": slide_id, "x": coords[:, 0], "y": coords[:, 1]},
                       index=pd.Index([f"{slide_id}:{i}" for i in range(len(coords))],
                                      name="tile"))
    uns = {"wsi_ssl": {
        "kind": "tiles", "slide_id": slide_id, "store": str(getattr(store, "path", "")),
        "store_fingerprint": str(getattr(store, "fingerprint", "")),
        "encoder_fingerprint": str(getattr(store, "encoder_fingerprint", "") or ""),
        "coordinates": "level-0 pixels (x, y), top-left of each tile",
        "tile_size_level0": float(attrs.get("tile_size_level0") or 0.0),
        "stride_level0": float(attrs.get("stride_level0") or 0.0),
        "mpp": float(attrs.get("mpp") or 0.0),
        "slide_attrs_json": json.dumps(attrs, default=str),
    }}
    return ad.AnnData(X=np.asarray(feats, np.float32), obs=obs,
                      obsm={"spatial": coords.astype(np.float64)}, uns=uns)


def embeddings_to_anndata(embeddings: Any, labels: Any = None, *,
                          id_col: str = "slide_id") -> Any:
    """Slide embeddings as an AnnData (one observation per slide), ``obs`` joined with a table.

    Args:
        embeddings: :class:`~wsi_ssl.store.SlideEmbeddings`.
        labels: optional DataFrame or CSV/TSV/parquet path with ``id_col``; its other columns
            become ``obs`` columns (slides without a row get missing values).
        id_col: the slide-id column of ``labels``.

    Returns:
        ``anndata.AnnData`` with ``X`` ``(n_slides, dim)``, ``obs`` indexed by slide id,
        ``uns["wsi_ssl"]`` the provenance.
    """
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    ad = _anndata()
    obs = pd.DataFrame(index=pd.Index(list(embeddings.slide_ids), name=id_col))
    if labels is not None:
        df = _read_labels(labels, id_col)
        obs = obs.join(df.set_index(id_col), how="left")
        for col in obs.columns:  # h5ad wants str, not mixed object columns
            if obs[col].dtype == object:
                obs[col] = obs[col].astype("string")
    uns = {"wsi_ssl": {"kind": "slide_embeddings",
                       "provenance_json": json.dumps(embeddings.provenance, default=str)}}
    return ad.AnnData(X=np.asarray(embeddings.embeddings, np.float32), obs=obs, uns=uns)


def _read_labels(labels: Any, id_col: str) -> Any:
    """A label table (DataFrame or .csv/.tsv/.parquet) with string slide ids in ``id_col``."""
    import pandas as pd  # lazy: pandas only for tables; keeps `import wsi_ssl` and the CLI light

    if isinstance(labels, pd.DataFrame):
        df, name = labels.copy(), "(DataFrame)"
    else:
        path = os.fspath(labels)
        name = f"'{path}'"
        if not os.path.exists(path):
            raise InputError(f"label table {name} does not exist.")
        if path.lower().endswith((".parquet", ".pq")):
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.lower().endswith(".tsv") else ",")
    if id_col not in df.columns:
        raise InputError(f"label table {name} has no column {id_col!r} (columns: "
                         f"{list(map(str, df.columns))[:10]}); pass id_col= naming the slide ids.")
    df[id_col] = df[id_col].astype(str)
    if df[id_col].duplicated().any():
        dup = df[id_col][df[id_col].duplicated()].tolist()[:5]
        raise InputError(f"label table {name} has duplicated slide ids {dup}; keep one row each.")
    return df
