# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Look inside: where the slide encoder looks, tile clusters, similar slides, QuPath
#
# A slide embedding nobody can inspect is hard to trust. This notebook opens the box:
#
# 1. **attention heatmaps**: the slide encoder's MIL head weighs every tile of a slide; drawn over
#    the thumbnail, the weights show what the embedding is made of;
# 2. **tile clusters**: k-means over one slide's tile features, a QC picture before any model;
# 3. **similar slides**: cosine nearest neighbours over slide embeddings (other patients only),
#    and the retrieval figures against the labels, vs mean-pooled tile features;
# 4. **QuPath and scverse**: the tissue outline and the tiles (with their attention and cluster)
#    as a GeoJSON that QuPath opens on the slide, and the tiles as an AnnData for scanpy.
#
# Inputs (environment variables): `WSI_SSL_EXAMPLE_OUT` (output folder, default
# `example_outputs/look_inside`), `WSI_SSL_EXAMPLE_N_SLIDES` (generated slides, default 16). The
# same calls work on the demo's outputs (`wsi-ssl demo`: `tiles.zarr`, `slide_model/`,
# `slide_embeddings.npz`, `cohort/`).

# %%
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

OUT = Path(os.environ.get("WSI_SSL_EXAMPLE_OUT", "example_outputs/look_inside"))
OUT.mkdir(parents=True, exist_ok=True)
N_SLIDES = int(os.environ.get("WSI_SSL_EXAMPLE_N_SLIDES", "16"))

# %% [markdown]
# ## A cohort with a known answer
# Generated slides: positives carry a tumour region (its map is saved next to the slides, so we
# can check the heatmaps), every slide may carry look-alike lymphoid "decoys". Tiles are embedded
# in this process (`client="sync"`), then a small slide encoder is trained without labels.

# %%
from wsi_ssl.datasets import make_cohort  # noqa: E402
from wsi_ssl.pretrain import SlideSSL  # noqa: E402
from wsi_ssl.store import TileStore  # noqa: E402
from wsi_ssl.tiling import embed_slides  # noqa: E402

cohort = make_cohort(OUT / "cohort", n_slides=N_SLIDES, seed=3, size=(2048, 2048),
                     tumor_fraction=(0.1, 0.2))
embed_slides(cohort.slides_dir, "tiny-cnn", OUT / "tiles.zarr", mpp=0.5, tile_size=112, views=4,
             view_tiles=16, client="sync", seed=0)
store = TileStore(OUT / "tiles.zarr", mode="r")
model = SlideSSL("abmil", tiles_per_view=16, epochs=40, batch_size=16, lr=1e-3, temperature=0.1,
                 warmup_epochs=2, embed_dim=128, proj_dims=(128, 64), seed=0).fit(store)
model.save(OUT / "slide_model")
ssl_emb = model.transform(store)
labels = cohort.labels
print(f"{len(store)} slides, {int(labels['label'].sum())} positive; "
      f"slide embeddings {ssl_emb.embeddings.shape}")

# %% [markdown]
# ## 1. Where the slide encoder looks
# `heatmap` runs the trained head over **every** tile of a slide and draws its attention weights
# (relative to uniform: 1 = an average tile). Same as `wsi-ssl heatmap SLIDE --store tiles.zarr
# --model slide_model --out heatmaps/`. The encoder never saw a label, yet the tiles it weighs
# most are tumour tiles: we count how many of the top-k are, against the tumour's share.

# %%
from wsi_ssl.eval import heatmap, tile_scores  # noqa: E402

pos = labels.query("label == 1")["slide_id"].tolist()
neg = labels.query("label == 0")["slide_id"].tolist()
path = {s: p for s, p in zip(cohort.slide_ids, cohort.paths, strict=True)}
hm_pos = heatmap(path[pos[0]], store, OUT / "slide_model", out_dir=OUT / "heatmaps")
hm_neg = heatmap(path[neg[0]], store, model, out_dir=OUT / "heatmaps")
print("wrote", hm_pos.figure, "and", hm_neg.figure)

hits, chance = [], []
for sid in pos:
    sc = tile_scores(store, sid, model)
    tumour = cohort.tile_fractions(sid, sc.coords, int(sc.tile_size_level0))[:, 2] > 0.5
    k = max(5, int(tumour.sum()))
    hits.append(float(tumour[sc.top_tiles(k)].mean()))
    chance.append(float(tumour.mean()))
print(f"top-k attention tiles in the tumour: {np.mean(hits):.2f} (chance {np.mean(chance):.2f})")

# %% [markdown]
# ## 2. Tile-feature clusters (QC, no model needed)

# %%
from wsi_ssl.eval import cluster_map  # noqa: E402

cm = cluster_map(path[pos[0]], store, n_clusters=5, out_dir=OUT / "heatmaps")
print("tiles per cluster:", np.bincount(cm.clusters).tolist(), "->", cm.figure)

# %% [markdown]
# ## 3. Similar slides, and how well embeddings retrieve slides of the same label
# `similar` is `wsi-ssl similar slide_embeddings.npz --query ID --k 3`; `retrieval_report` is
# `wsi-ssl retrieval-report slide_embeddings.npz labels.csv` (majority-vote accuracy @1/3/5,
# mAP@5; a query never retrieves its own patient's slides).

# %%
from wsi_ssl.eval import plot_retrieval, retrieval_report, similar  # noqa: E402
from wsi_ssl.pretrain import mean_pool_embeddings  # noqa: E402

print(similar(ssl_emb, pos[0], k=3, patients=cohort.labels_csv).to_frame().to_string(index=False))
mean_emb = mean_pool_embeddings(store)
reports = {"slide-ssl": retrieval_report(ssl_emb, labels, n_bootstrap=200),
           "mean-pool": retrieval_report(mean_emb, labels, n_bootstrap=200)}
for name, rep in reports.items():
    print(name, {m: round(v["value"], 3) for m, v in rep.metrics.items()})
plot_retrieval(reports).savefig(OUT / "retrieval.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# ## 4. Hand it to QuPath and scanpy
# The GeoJSON is in level-0 pixels: open the slide in QuPath and drag the file onto it; each tile
# is a detection with measurements `tissue_fraction`, `heatmap_score` and `cluster` (colour the
# detections by a measurement in *Measure > Show measurement maps*).

# %%
from wsi_ssl.eval import export_geojson  # noqa: E402

geo = export_geojson(path[pos[0]], OUT / f"{pos[0]}.geojson", store=store, scores=hm_pos,
                     n_clusters=5)
print(f"{geo.n_annotations} tissue annotations, {geo.n_detections} tiles -> {geo.path}")

# %% [markdown]
# AnnData (`pip install "wsi-ssl[anndata]"`): tile features in `X`, level-0 positions in
# `obsm["spatial"]`. With scanpy: `sc.pp.neighbors(adata); sc.tl.leiden(adata)`; with squidpy:
# `sq.gr.spatial_neighbors(adata, coord_type="generic")`.

# %%
try:
    from wsi_ssl.store import tiles_to_anndata

    adata = tiles_to_anndata(store, pos[0])
    adata.obs["attention"] = hm_pos.scores
    adata.write_h5ad(OUT / f"{pos[0]}.h5ad")
    print(adata)
    n_obs = int(adata.n_obs)
except ImportError:  # the optional extra is not installed
    n_obs = 0

# %%
summary = {
    "heatmap": {"slide": pos[0], "n_tiles": len(hm_pos), "precision_at_k": float(np.mean(hits)),
                "chance": float(np.mean(chance))},
    "clusters": np.bincount(cm.clusters).tolist(),
    "retrieval": {n: {m: v["value"] for m, v in r.metrics.items()} for n, r in reports.items()},
    "geojson": {"path": str(geo.path), "n_annotations": geo.n_annotations,
                "n_detections": geo.n_detections},
    "anndata_n_obs": n_obs,
}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary["retrieval"], indent=1))
