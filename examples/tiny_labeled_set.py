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
# # A tiny labelled set: few-shot classifier and survival on slide embeddings, vs supervised MIL
#
# Slide embeddings learned without labels (Giga-SSL) make a linear model enough: train it on 8 or
# 16 labelled slides and score it on held-out slides; fit a Cox model for survival. Compared with
# mean-pooled tile features (the label lives in a minority of the tissue, so the mean dilutes it)
# and with a supervised attention-MIL model (ABMIL) trained on the same few labelled slides.
#
# Inputs (environment variables, small defaults):
# - `WSI_SSL_EXAMPLE_STORE`, `WSI_SSL_EXAMPLE_EMBEDDINGS`, `WSI_SSL_EXAMPLE_LABELS`: a tile store,
#   its slide embeddings (`.npz`/`.csv`/`.parquet`) and a table with `slide_id, label, time,
#   event` (e.g. the outputs of `compress_a_cohort`). Default: made here from a generated
#   cohort of `WSI_SSL_EXAMPLE_N_SLIDES` (24) small slides.
# - `WSI_SSL_EXAMPLE_OUT`: output folder (default `example_outputs/tiny_labeled_set`).
#
# On a cohort this small the numbers are noisy (a handful of held-out slides); the demo
# (`wsi-ssl demo`) and `benchmarks/` run the same comparison with more slides and repeats.

# %%
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

OUT = Path(os.environ.get("WSI_SSL_EXAMPLE_OUT", "example_outputs/tiny_labeled_set"))
OUT.mkdir(parents=True, exist_ok=True)
STORE = os.environ.get("WSI_SSL_EXAMPLE_STORE")
EMBEDDINGS = os.environ.get("WSI_SSL_EXAMPLE_EMBEDDINGS")
LABELS = os.environ.get("WSI_SSL_EXAMPLE_LABELS")
N_SLIDES = int(os.environ.get("WSI_SSL_EXAMPLE_N_SLIDES", "24"))

# %% [markdown]
# ## The inputs
# Without inputs, a generated cohort: positive slides carry a small tumour region (a few to
# 15 % of the tissue), every slide may carry look-alike lymphoid "decoy" regions, and survival
# times shorten with the tumour extent. Embedding and slide SSL run in this process (small).

# %%
from wsi_ssl.pretrain import mean_pool_embeddings  # noqa: E402
from wsi_ssl.store import SlideEmbeddings, TileStore  # noqa: E402

if STORE is None or EMBEDDINGS is None or LABELS is None:
    from wsi_ssl.datasets import make_cohort
    from wsi_ssl.pretrain import SlideSSL
    from wsi_ssl.tiling import embed_slides

    cohort = make_cohort(OUT / "cohort", n_slides=N_SLIDES, seed=1, size=(1536, 1536))
    STORE, LABELS = OUT / "tiles.zarr", cohort.labels_csv
    embed_slides(cohort.slides_dir, "tiny-cnn", STORE, mpp=0.5, tile_size=112, views=6,
                 view_tiles=24, client="sync", seed=0)
    # k = 24 tiles per view: the label region is small, a 5-tile view would mostly miss it
    ssl = SlideSSL(head="sparseconv", tiles_per_view=24, epochs=30, batch_size=N_SLIDES,
                   lr=1e-3, warmup_epochs=2, seed=0).fit(TileStore(STORE, mode="r"))
    EMBEDDINGS = ssl.transform(TileStore(STORE, mode="r")).save(OUT / "slide_embeddings.npz")

store = TileStore(STORE, mode="r")
ssl_emb = SlideEmbeddings.load(EMBEDDINGS)
labels = pd.read_csv(LABELS, dtype={"slide_id": str})
labels = labels[labels["slide_id"].isin(ssl_emb.slide_ids)].reset_index(drop=True)
print(f"{len(labels)} labelled slides ({int(labels['label'].sum())} positive), "
      f"embeddings {ssl_emb.embeddings.shape}")

# the baseline: the mean of each slide's tile features
ids = labels["slide_id"].tolist()
mean_emb = mean_pool_embeddings(store, ids)

# %% [markdown]
# ## Few-shot linear probes
# A fixed held-out side (a quarter of the slides); logistic regressions trained on random subsets
# of `n` labelled slides from the rest, `repeats` times; AUC on the held-out side with a
# bootstrap 95 % interval.

# %%
from wsi_ssl.eval import linear_probe, survival  # noqa: E402

N_LABELED = (8, 16)
probes = {}
for name, emb in (("slide-ssl", ssl_emb), ("mean-pool", mean_emb)):
    probes[name] = linear_probe(emb, labels, n_labeled=N_LABELED, repeats=5, folds=None,
                                seed=0)
    probes[name].save(OUT / "probe" / name)
table = pd.concat({k: r.to_frame().set_index("name")[["auc_mean", "auc_std"]]
                   for k, r in probes.items()}, axis=1)
print(table.round(3))

# %% [markdown]
# ## Supervised MIL on the same labelled slides
# ABMIL (attention pooling over the tile features) trained from the labels alone, on the same
# training subsets, scored on the same held-out slides.

# %%
from sklearn.metrics import roc_auc_score  # noqa: E402

from wsi_ssl.mil import MILClassifier  # noqa: E402

report = probes["slide-ssl"]
heldout = [s for s, h in zip(report.slide_ids, report.heldout, strict=True) if h]
train_side = [s for s, h in zip(report.slide_ids, report.heldout, strict=True) if not h]
y_of = dict(zip(labels["slide_id"], labels["label"], strict=True))
y_test = np.array([y_of[s] for s in heldout])
rng = np.random.default_rng(0)
mil_auc = {}
for n in N_LABELED:
    aucs = []
    for _ in range(2):
        pick = []  # n // 2 slides of each class, like a balanced labelling budget
        for cls in (0, 1):
            side = [s for s in train_side if y_of[s] == cls]
            pick += list(rng.choice(side, size=min(n // 2, len(side)), replace=False))
        clf = MILClassifier("abmil", embed_dim=64, epochs=20, device="cpu", seed=0)
        clf.fit(store, [y_of[s] for s in pick], slide_ids=pick)
        proba = clf.predict_proba(store, slide_ids=heldout)[:, list(clf.classes_).index(1)]
        aucs.append(roc_auc_score(y_test, proba))
    mil_auc[n] = (float(np.mean(aucs)), float(np.std(aucs)))
    print(f"ABMIL, {n} labelled slides: AUC {mil_auc[n][0]:.3f} ± {mil_auc[n][1]:.3f}")

# %% [markdown]
# ## Survival from the slide embeddings
# Out-of-fold Cox models (PCA inside each fold, penalty by inner CV); the C-index says how well
# the predicted risk orders the survival times, the Kaplan-Meier plot splits slides at the median
# training risk.

# %%
surv = survival(ssl_emb, labels, folds=3, seed=0)
surv.save(OUT / "survival")
print(surv.summary)

summary = {
    "probe": {k: r.to_frame()[["name", "auc_mean", "auc_std"]].to_dict("records")
              for k, r in probes.items()},
    "abmil": {str(n): v for n, v in mil_auc.items()},
    "c_index": surv.c_index_mean,
}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
