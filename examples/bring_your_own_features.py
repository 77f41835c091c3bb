# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Bring your own features: CLAM / TRIDENT / STAMP `.h5` files -> tile store -> slide SSL
#
# Tile features you already computed (CLAM and TRIDENT write `features` + `coords` per slide,
# KatherLab's STAMP writes `feats` + `coords`) go into a wsi-ssl tile store without touching the
# slides again, and slide-level pretraining runs on them.
#
# Inputs (environment variables, small defaults):
# - `WSI_SSL_EXAMPLE_H5`: one `.h5` file, a folder of them, or a glob. Default: the real STAMP
#   features of the TCGA colorectal slide TCGA-AD-6964-01Z-00-DX1 (777 tiles x 512; from
#   KatherLab/mopadi, MIT; TCGA open access) in the test data folder.
# - `WSI_SSL_EXAMPLE_OUT`: output folder (default `example_outputs/byof`).
#
# With a single file (the default) there is one slide, and contrastive pretraining needs a
# cohort: the notebook then cuts that slide into spatial regions and treats each as a slide, only
# to have something to train on. With your own folder of per-slide files, every file is a slide.

# %%
import glob
import json
import os
from pathlib import Path

import h5py
import numpy as np

try:
    HERE = Path(__file__).resolve().parent
except NameError:  # running as a notebook
    HERE = Path.cwd()
DATA = Path(os.environ.get("WSI_SSL_TEST_DATA", HERE.parent.parent / "shared" / "data"))
OUT = Path(os.environ.get("WSI_SSL_EXAMPLE_OUT", "example_outputs/byof"))
OUT.mkdir(parents=True, exist_ok=True)
H5 = os.environ.get("WSI_SSL_EXAMPLE_H5",
                    str(DATA / "features" / "TCGA-AD-6964-01Z-00-DX1" / "features.h5"))
if Path(H5).is_dir():
    files = sorted(Path(H5).glob("*.h5"))
else:
    files = [Path(p) for p in sorted(glob.glob(H5))]
print(f"{len(files)} feature file(s):", [str(f) for f in files[:3]])

# %% [markdown]
# ## What is in a feature file

# %%
with h5py.File(files[0], "r") as fh:
    for name, ds in fh.items():
        print(f"  {name}: {ds.shape} {ds.dtype}")
    key = "feats" if "feats" in fh else "features"
    coords0 = fh["coords"][:]
print("layout:", "STAMP" if key == "feats" else "CLAM/TRIDENT")

# %% [markdown]
# ## Import into a tile store
# `import_h5` reads either layout, names each slide after its file (or its folder when the file
# is called `features.h5`) and binds the store to the encoder name and dimension, so features of
# another encoder cannot be mixed in later.

# %%
from wsi_ssl.store import TileStore  # noqa: E402

real_store = TileStore(OUT / "imported.zarr", mode="w")
ids = real_store.import_h5(files, encoder="stamp-features")
rec = real_store[ids[0]]
print(f"imported {ids}: features {rec.features.shape} {rec.features.dtype}, coords "
      f"{rec.coords.shape}, attrs {sorted(rec.attrs)[:6]}...")
assert np.array_equal(rec.coords, coords0)

# %% [markdown]
# ## A cohort to pretrain on
# With several files they are the cohort. With one, cut it into a 3 x 3 grid of regions (each a
# pseudo-slide), written in the CLAM/TRIDENT layout to show the other reader too.

# %%
if len(files) >= 2:
    store, slide_ids = real_store, ids
else:
    with h5py.File(files[0], "r") as fh:
        feats, coords = fh[key][:], fh["coords"][:]
    edges = [np.quantile(coords[:, a], [1 / 3, 2 / 3]) for a in (0, 1)]
    cell = np.digitize(coords[:, 0], edges[0]) * 3 + np.digitize(coords[:, 1], edges[1])
    region_dir = OUT / "regions_h5"
    region_dir.mkdir(exist_ok=True)
    for c in np.unique(cell):
        keep = cell == c
        if keep.sum() < 20:
            continue
        with h5py.File(region_dir / f"region_{c}.h5", "w") as fh:
            fh["features"] = feats[keep]
            fh["coords"] = coords[keep]
            fh["coords"].attrs["patch_size"] = int(np.diff(np.unique(coords[:, 0])).min())
            fh["coords"].attrs["patch_level"] = 0
    store = TileStore(OUT / "regions.zarr", mode="w")
    slide_ids = store.import_h5(region_dir, encoder="stamp-features")
print(f"{len(slide_ids)} slides to pretrain on: {slide_ids}")

# %% [markdown]
# ## A view bank in feature space
# Slide SSL trains on augmented versions of each slide. Embedding from pixels (`embed_slides(...,
# views=V)`) makes them from augmented tiles; imported features have no pixels, so here each
# version is a random sample of tiles with one random per-dimension rescaling shared by the whole
# version (the feature-space analogue of Giga-SSL's shared augmentation) plus a little per-tile
# noise.

# %%
rng = np.random.default_rng(0)
V, T = 8, 64
for sid in slide_ids:
    r = store[sid]
    x = r.features.astype(np.float32)
    scale = x.std(0) + 1e-6
    view_index = rng.integers(0, len(x), size=(V, T))
    shared = rng.lognormal(0.0, 0.1, size=(V, 1, x.shape[1])).astype(np.float32)
    views = x[view_index] * shared + 0.1 * scale * rng.standard_normal((V, T, x.shape[1]),
                                                                       dtype=np.float32)
    store.write_slide(sid, r.features, r.coords, views=views, view_index=view_index,
                      attrs={**r.attrs, "views": "feature-space (example)"})
print(store)

# %% [markdown]
# ## Slide-level contrastive pretraining and compact embeddings

# %%
from wsi_ssl.pretrain import SlideSSL  # noqa: E402

model = SlideSSL(head="abmil", epochs=25, batch_size=len(slide_ids), lr=1e-3, warmup_epochs=2,
                 device="auto", seed=0)
model.fit(store)
emb = model.transform(store)
emb.save(OUT / "slide_embeddings.npz")
print(f"loss {model.history_[0]:.3f} -> {model.history_[-1]:.3f}; embeddings {emb.embeddings.shape}, "
      f"{emb.nbytes_per_slide:.0f} bytes per slide")
e = emb.embeddings.astype(np.float32)
sim = e @ e.T
print("cosine similarity between the first slides:\n", np.round(sim[:4, :4], 2))

# %% [markdown]
# ## And back out
# `export_h5` writes a store in the CLAM/TRIDENT layout for tools that read those files.

# %%
exported = store.export_h5(OUT / "exported_h5")
print(f"exported {len(exported)} files to {OUT / 'exported_h5'}")
(OUT / "summary.json").write_text(json.dumps({
    "n_imported": len(ids), "n_slides": len(slide_ids), "dim": emb.dim,
    "bytes_per_slide": emb.nbytes_per_slide, "final_loss": float(model.history_[-1]),
}, indent=2))
