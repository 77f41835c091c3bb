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
# # Tiling as a library, from a notebook
#
# Open a slide, look at the tissue detection and the tile grid, read the tiles lazily as a dask
# array, and embed one slide with a tile encoder: the building blocks that `wsi-ssl embed` runs
# for a whole cohort, usable one by one.
#
# Inputs (environment variables, small defaults):
# - `WSI_SSL_EXAMPLE_SLIDE`: a slide file. Default: the real H&E slide CMU-1-Small-Region
#   (OpenSlide test data, Apache-2.0) from the test data folder; if that folder is missing, a
#   generated slide.
# - `WSI_SSL_EXAMPLE_OUT`: output folder (default `example_outputs/tiling`).
# - `WSI_SSL_EXAMPLE_ENCODER`: tile encoder (default `tiny-cnn`, random weights, CPU-fast; on a
#   GPU use a real one, e.g. `resnet50` with `weights=` your checkpoint).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from wsi_ssl.tiling import detect_tissue, open_slide, plot_grid, tile_grid, tiles_as_dask  # noqa: E402

try:
    HERE = Path(__file__).resolve().parent
except NameError:  # running as a notebook
    HERE = Path.cwd()
DATA = Path(os.environ.get("WSI_SSL_TEST_DATA", HERE.parent.parent / "shared" / "data"))
OUT = Path(os.environ.get("WSI_SSL_EXAMPLE_OUT", "example_outputs/tiling"))
OUT.mkdir(parents=True, exist_ok=True)
ENCODER = os.environ.get("WSI_SSL_EXAMPLE_ENCODER", "tiny-cnn")

slide_path = os.environ.get("WSI_SSL_EXAMPLE_SLIDE")
if slide_path is None:
    real = DATA / "slides" / "cmu-1-small-region.svs"
    if real.is_file():
        slide_path = real
    else:  # no test data here: draw a slide instead
        from wsi_ssl.datasets import make_slide

        slide_path = make_slide(OUT / "generated.tif", seed=0, size=(2048, 2048)).path
print("slide:", slide_path)

# %% [markdown]
# ## Open the slide
# `open_slide` picks a backend (OpenSlide, else tiffslide/tifffile) and gives one small,
# OpenSlide-shaped interface. Coordinates are level-0 pixels `(x, y)`; resolutions in µm/px.

# %%
slide = open_slide(slide_path)
print(f"{slide.slide_id}: {slide.dimensions[0]} x {slide.dimensions[1]} px, "
      f"{slide.level_count} level(s), {slide.slide_mpp:.3f} µm/px, backend {slide.backend}")

# %% [markdown]
# ## Tissue detection and the tile grid
# Tissue is found on a thumbnail (Otsu on saturation, pen marks removed); the grid keeps the
# tiles of 224 px at 0.5 µm/px (20x) with at least 25 % tissue.

# %%
tissue = detect_tissue(slide)
grid = tile_grid(slide, mpp=0.5, tile_size=224, min_tissue=0.25, tissue=tissue)
print(f"tissue: {tissue.fraction:.1%} of the thumbnail; {len(grid)} tiles of {grid.tile_size} px "
      f"at {grid.mpp} µm/px read from level {grid.level} ({grid.read_size} px)")
fig = plot_grid(slide, grid, tissue)
fig.savefig(OUT / "grid.png", dpi=100, bbox_inches="tight")
fig  # noqa: B018 (shows the figure in a notebook)

# %% [markdown]
# ## Tiles as a lazy dask array
# Nothing is read until a chunk is computed, so the array can be sliced, mapped or reduced with
# dask on a laptop or a cluster.

# %%
tiles = tiles_as_dask(slide, grid, chunk_size=64)
print(tiles)
mean_rgb = tiles.mean(axis=(1, 2)).compute()  # (N, 3) mean colour per tile
print("mean RGB of the first 3 tiles:", np.round(mean_rgb[:3], 1).tolist())

first = tiles[:16].compute()
mosaic = first.reshape(4, 4, *first.shape[1:]).transpose(0, 2, 1, 3, 4)
mosaic = mosaic.reshape(4 * first.shape[1], 4 * first.shape[2], 3)
plt.imsave(OUT / "tiles.png", mosaic)

# %% [markdown]
# ## Embed the slide
# A `TileEncoder` takes uint8 tiles `(B, H, W, 3)`, resizes and normalises them on its device and
# returns float32 features `(B, D)`. `read_tiles` yields batches in grid order.

# %%
from wsi_ssl.encoders import create_encoder  # noqa: E402
from wsi_ssl.tiling import read_tiles  # noqa: E402

encoder = create_encoder(ENCODER, device="auto")
feats = np.zeros((len(grid), encoder.embed_dim), np.float32)
for batch in read_tiles(slide, grid, batch_size=64):
    feats[batch.indices] = encoder.embed(batch.tiles).numpy()
print(f"features {feats.shape} from {encoder.name} (fingerprint {encoder.fingerprint[:12]})")
np.savez(OUT / "features.npz", features=feats, coords=grid.coords)

# %% [markdown]
# A look at the features: the first principal component of each tile, painted on the grid.

# %%
centred = feats - feats.mean(0)
pc1 = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(grid.coords[:, 0], grid.coords[:, 1], c=pc1, marker="s", s=12, cmap="viridis")
ax.invert_yaxis()
ax.set_aspect("equal")
ax.set_title("first principal component of the tile features")
fig.savefig(OUT / "features_pc1.png", dpi=100, bbox_inches="tight")
slide.close()
print("outputs in", OUT)
