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
# # Compress a cohort: slides -> tile store -> slide SSL -> a few KB per slide
#
# The "compress TCGA" use: embed every slide of a folder into a zarr tile store (with the
# Giga-SSL shared-augmentation bank), pretrain a slide encoder without labels, and export one
# compact embedding per slide. Here on a small generated cohort on the CPU; the cells say which
# settings a TCGA run changes.
#
# Inputs (environment variables, small defaults):
# - `WSI_SSL_EXAMPLE_SLIDES`: a folder (or glob) of slides. Default: a generated cohort of
#   `WSI_SSL_EXAMPLE_N_SLIDES` (12) slides of 1536 x 1536 px at 0.5 µm/px.
# - `WSI_SSL_EXAMPLE_OUT`: output folder (default `example_outputs/compress`).
# - `WSI_SSL_EXAMPLE_SCHEDULER`: a dask scheduler address (`tcp://host:8786`); default: a dask
#   cluster inside this process (`processes=False`, notebook-friendly) with
#   `WSI_SSL_EXAMPLE_WORKERS` (1) workers.
# - `WSI_SSL_EXAMPLE_EPOCHS`: slide-SSL epochs (default 30).

# %%
import json
import os
from pathlib import Path

OUT = Path(os.environ.get("WSI_SSL_EXAMPLE_OUT", "example_outputs/compress"))
OUT.mkdir(parents=True, exist_ok=True)
SLIDES = os.environ.get("WSI_SSL_EXAMPLE_SLIDES")
N_SLIDES = int(os.environ.get("WSI_SSL_EXAMPLE_N_SLIDES", "12"))
SCHEDULER = os.environ.get("WSI_SSL_EXAMPLE_SCHEDULER")  # None: a local dask cluster
WORKERS = int(os.environ.get("WSI_SSL_EXAMPLE_WORKERS", "1"))
EPOCHS = int(os.environ.get("WSI_SSL_EXAMPLE_EPOCHS", "30"))

if SLIDES is None:
    from wsi_ssl.datasets import make_cohort

    cohort = make_cohort(OUT / "cohort", n_slides=N_SLIDES, seed=0, size=(1536, 1536))
    SLIDES = str(cohort.slides_dir)
print("slides:", SLIDES)

# %% [markdown]
# ## 1. Tile embeddings into a zarr store
# `embed_slides` runs one dask task per slide (tiles are read in batches through the TIFF tile
# index, the encoder sees uint8 batches). `views=V` adds V augmented versions of `view_tiles`
# tiles per slide (the same augmentation for every tile of a version: Giga-SSL's bank).
#
# **TCGA settings**: `encoder="resnet50"` (or a foundation model, `weights=` your checkpoint),
# `tile_size=224`, `views=50`, `view_tiles=256`, `device="cuda"`, and `client="tcp://scheduler:8786"`
# for a dask cluster with one GPU per worker (`embed_slides(client=None)` starts a local
# multi-process cluster sized to the machine; from a script that needs the usual
# `if __name__ == "__main__":` guard). A rerun skips finished slides.

# %%
from distributed import Client, LocalCluster  # noqa: E402

from wsi_ssl.store import TileStore  # noqa: E402
from wsi_ssl.tiling import embed_slides  # noqa: E402

if SCHEDULER:
    client = Client(SCHEDULER)
else:
    client = Client(LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=False,
                                 dashboard_address=":0"))
print(client)

store_path = OUT / "tiles.zarr"
report = embed_slides(
    SLIDES, "tiny-cnn", store_path,
    mpp=0.5, tile_size=112, views=8, view_tiles=32,
    client=client, device="auto", seed=0,
)
print(f"{len(report.done)} slides embedded, {len(report.skipped)} reused, {len(report.failed)} "
      f"failed; {report.n_tiles} tiles + {report.n_view_tiles} view tiles at "
      f"{report.tiles_per_second:.0f} tiles/s")
store = TileStore(store_path, mode="r")
print(store)

# %% [markdown]
# ## 2. Slide-level contrastive pretraining (Giga-SSL), no labels
# Two views of a slide (k tiles sampled from one augmented version, coordinates augmented) are a
# positive pair; the other slides of the batch are negatives. Checkpointed every epoch:
# `fit(store, resume=True)` continues an interrupted run.
#
# **TCGA settings**: the paper's defaults (`SlideSSL()`: batch 256, lr 0.03, 3000 epochs) on a GPU.

# %%
from wsi_ssl.pretrain import SlideSSL  # noqa: E402

model = SlideSSL(head="sparseconv", epochs=EPOCHS, batch_size=min(32, len(store)), lr=1e-3,
                 warmup_epochs=2, checkpoint_dir=OUT / "slide_ssl_ckpt", device="auto", seed=0)
model.fit(store, resume=True)
model.save(OUT / "slide_model")
print(f"loss {model.history_[0]:.3f} -> {model.history_[-1]:.3f} over {len(model.history_)} "
      f"epochs, {model.train_views_per_s_:.0f} views/s")

# %% [markdown]
# ## 3. Export compact slide embeddings

# %%
embeddings = model.transform(store, dtype="float16")
emb_path = embeddings.save(OUT / "slide_embeddings.npz")


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


slide_files = [p for p in Path(SLIDES).iterdir() if p.is_file()] if Path(SLIDES).is_dir() else []
sizes = {
    "slides": sum(p.stat().st_size for p in slide_files),
    "tile store": folder_bytes(store_path),
    "slide embeddings": folder_bytes(emb_path),
}
n = len(embeddings)
print(f"{n} slides x {embeddings.dim} float16 = {embeddings.nbytes_per_slide:.0f} bytes per slide")
for name, b in sizes.items():
    if b:
        print(f"  {name:>16}: {b / 1e6:9.3f} MB  ({b / n / 1e3:9.1f} KB per slide)")
summary = {"n_slides": n, "dim": embeddings.dim, "bytes_per_slide": embeddings.nbytes_per_slide,
           "final_loss": float(model.history_[-1]), "sizes": sizes}
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(embeddings.to_pandas().iloc[:3, :6])
client.close()
