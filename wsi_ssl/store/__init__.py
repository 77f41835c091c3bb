"""The zarr v3 tile store and slide-embedding files (see ``docs/store-format.md``)."""

from wsi_ssl.store._embeddings import SlideEmbeddings, load_embeddings

__all__ = ["SlideEmbeddings", "load_embeddings"]
