"""scverse export: tile-store slides and slide embeddings as AnnData, written to .h5ad and read
back, with the neighbourhood graphs scanpy / squidpy would build (here with scikit-learn)."""

from __future__ import annotations

import builtins
import json

import numpy as np
import pandas as pd
import pytest

from tests._inspect_cohort import inspect_cohort
from wsi_ssl.errors import BackendUnavailableError, InputError
from wsi_ssl.store import SlideEmbeddings, tiles_to_anndata

anndata = pytest.importorskip("anndata", reason="anndata is in the dev extra")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory):
    return inspect_cohort(tmp_path_factory)


def test_tile_slide_round_trips_through_h5ad(cohort_store, tmp_path):
    cohort, store = cohort_store
    sid = cohort.labels.query("label == 1")["slide_id"].iloc[0]
    rec = store[sid]
    adata = tiles_to_anndata(store, sid)
    adata.write_h5ad(tmp_path / "tiles.h5ad")
    back = anndata.read_h5ad(tmp_path / "tiles.h5ad")
    np.testing.assert_array_equal(back.X, np.asarray(rec.features, np.float32))
    np.testing.assert_array_equal(back.obsm["spatial"], rec.coords)
    assert (back.obs["slide_id"] == sid).all()
    np.testing.assert_array_equal(back.obs[["x", "y"]].to_numpy(), rec.coords)
    prov = back.uns["wsi_ssl"]
    assert prov["slide_id"] == sid and prov["encoder_fingerprint"] == store.encoder_fingerprint
    assert json.loads(prov["slide_attrs_json"])["tile_size_level0"] == prov["tile_size_level0"]

    # squidpy.gr.spatial_neighbors-like grid graph: 4 neighbours one stride away in the interior
    from sklearn.neighbors import radius_neighbors_graph

    stride = prov["stride_level0"]
    g = radius_neighbors_graph(back.obsm["spatial"], 1.01 * stride, include_self=False)
    deg = np.asarray(g.sum(1)).ravel()
    assert deg.max() == 4 and np.median(deg) >= 3

    # scanpy.pp.neighbors-like kNN graph on X: tumour tiles' neighbours are mostly tumour
    from sklearn.neighbors import kneighbors_graph

    tumour = cohort.tile_fractions(sid, back.obsm["spatial"], int(prov["tile_size_level0"]))[:, 2]
    tumour = tumour > 0.5
    knn = kneighbors_graph(back.X / np.linalg.norm(back.X, axis=1, keepdims=True), 10)
    same = np.asarray(knn[tumour][:, tumour].sum(1)).ravel() / 10
    assert same.mean() > 3 * tumour.mean(), (same.mean(), tumour.mean())


def test_slide_embeddings_to_anndata_joins_labels(cohort_store, tmp_path):
    cohort, _ = cohort_store
    ids = list(cohort.labels["slide_id"])[::-1] + ["not_in_table"]
    emb = SlideEmbeddings(tuple(ids), np.arange(len(ids) * 3, dtype=np.float32).reshape(-1, 3),
                          {"method": "test", "n": 3})
    adata = emb.to_anndata(cohort.labels_csv)
    adata.write_h5ad(tmp_path / "slides.h5ad")
    back = anndata.read_h5ad(tmp_path / "slides.h5ad")
    assert list(back.obs_names) == ids
    np.testing.assert_array_equal(back.X, emb.embeddings)
    lab = cohort.labels.set_index("slide_id")
    assert back.obs.loc[ids[0], "label"] == lab.loc[ids[0], "label"]
    assert back.obs.loc[ids[3], "patient_id"] == lab.loc[ids[3], "patient_id"]
    assert pd.isna(back.obs.loc["not_in_table", "label"])
    assert json.loads(back.uns["wsi_ssl"]["provenance_json"]) == {"method": "test", "n": 3}
    assert emb.to_anndata().n_obs == len(ids)  # no table: ids only
    with pytest.raises(InputError, match="no column 'sample'"):
        emb.to_anndata(cohort.labels_csv, id_col="sample")


def test_missing_anndata_says_what_to_install(cohort_store, monkeypatch):
    _, store = cohort_store
    real_import = builtins.__import__

    def no_anndata(name, *args, **kwargs):
        if name == "anndata":
            raise ImportError("No module named 'anndata'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_anndata)
    with pytest.raises(BackendUnavailableError, match=r"pip install \"wsi-ssl\[anndata\]\""):
        tiles_to_anndata(store, store.slide_ids[0])
    with pytest.raises(InputError, match="'nope' is not a complete slide"):
        monkeypatch.undo()
        tiles_to_anndata(store, "nope")
