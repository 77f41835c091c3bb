"""Stream random tissue tiles from a list of slides (no pre-extraction to disk).

A :class:`TileSSLDataset` is a torch ``IterableDataset`` that yields ready-made **batches** of
uint8 tiles ``(B, 3, T, T)``. Each batch is drawn from a few random slides (``tiles_per_slide``
tiles each, so a batch mixes slides) at random tissue positions of the slide's tile grid, read
through the tiling library (``open_slide`` / ``tile_grid`` / ``read_tiles``). Every DataLoader
worker keeps at most ``max_open_slides`` slides (handle + grid) open in an LRU cache, so memory
stays bounded whatever the number of slides; a slide that cannot be opened, or has no tissue, is
skipped with a warning.

Randomness depends only on ``(seed, epoch, worker id)``: an epoch replays exactly after a resume.
Coordinates are level-0 pixels ``(x, y)``; ``mpp`` in µm/px.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from wsi_ssl._validation import Interval, validate_params
from wsi_ssl.errors import InputError, WsiSslError
from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

__all__ = ["TileSSLDataset", "make_tile_loader"]

logger = logging.getLogger(__name__)

_DATASET_CONSTRAINTS: dict[str, list[Any]] = {
    "tile_size": [Interval(int, 8, None)],
    "batch_size": [Interval(int, 2, None)],
    "batches_per_epoch": [Interval(int, 1, None)],
    "tiles_per_slide": [Interval(int, 1, None)],
    "max_open_slides": [Interval(int, 1, None)],
    "mpp": [Interval(float, 0, None, closed="neither")],
}


class TileSSLDataset(IterableDataset):
    """Batches of random tissue tiles from ``slides``, ``batches_per_epoch`` per epoch.

    Args:
        slides: slide files.
        tile_size: tile edge in pixels at ``mpp``.
        mpp: target resolution (µm/px).
        batch_size: tiles per yielded batch.
        batches_per_epoch: batches one pass (all workers together) yields.
        tiles_per_slide: tiles read from one slide for one batch (reads are grouped per slide).
        min_tissue: minimum tissue fraction of a grid tile to be sampled.
        assume_mpp: MPP to use for slides without it in their metadata (``None``: such slides
            are skipped with a warning).
        max_open_slides: per-worker LRU cache of open slides and their grids.
        seed: base seed; the stream depends on ``(seed, epoch, worker)``.

    Yields:
        uint8 tensors ``(B, 3, tile_size, tile_size)`` (the last batch of a worker may be full
        too: every batch has exactly ``batch_size`` tiles).
    """

    def __init__(self, slides: Sequence[str | os.PathLike], *, tile_size: int = 224,
                 mpp: float = 0.5, batch_size: int = 64, batches_per_epoch: int = 100,
                 tiles_per_slide: int = 8, min_tissue: float = 0.5,
                 assume_mpp: float | None = None, max_open_slides: int = 8,
                 seed: int = 0) -> None:
        super().__init__()
        self.slides = [Path(p) for p in slides]
        if not self.slides:
            raise InputError("TileSSLDataset got no slides; pass at least one slide file.")
        validate_params("TileSSLDataset", {
            "tile_size": tile_size, "batch_size": batch_size,
            "batches_per_epoch": batches_per_epoch, "tiles_per_slide": tiles_per_slide,
            "max_open_slides": max_open_slides, "mpp": mpp}, _DATASET_CONSTRAINTS,
            hint="(mpp: µm/px, e.g. 0.5 for 20x)")
        self.tile_size = int(tile_size)
        self.mpp = float(mpp)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.tiles_per_slide = int(tiles_per_slide)
        self.min_tissue = float(min_tissue)
        self.assume_mpp = assume_mpp
        self.max_open_slides = int(max_open_slides)
        self.seed = int(seed)
        self.epoch = 0
        self._cache: OrderedDict[int, tuple[Any, Any]] = OrderedDict()
        self._bad: set[int] = set()

    def __getstate__(self) -> dict[str, Any]:
        # open slide handles do not travel to DataLoader workers; each worker opens its own
        state = self.__dict__.copy()
        state["_cache"] = OrderedDict()
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the random stream of ``epoch`` (call before iterating, as with samplers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- slides ----------------------------------------------------------------------------
    def _open(self, i: int) -> tuple[Any, Any] | None:
        """``(slide, grid)`` of slide ``i`` from the LRU cache, or ``None`` if unusable."""
        if i in self._bad:
            return None
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        path = self.slides[i]
        try:
            slide = open_slide(path, slide_mpp=self.assume_mpp)
            grid = tile_grid(slide, mpp=self.mpp, tile_size=self.tile_size,
                             min_tissue=self.min_tissue)
        except WsiSslError as err:
            logger.warning("skipping slide '%s' for tile SSL: %s", path, err)
            self._bad.add(i)
            return None
        if len(grid) == 0:
            logger.warning("skipping slide '%s' for tile SSL: no tile with >= %.0f%% tissue at "
                           "%.3g µm/px", path, 100 * self.min_tissue, self.mpp)
            slide.close()
            self._bad.add(i)
            return None
        self._cache[i] = (slide, grid)
        while len(self._cache) > self.max_open_slides:
            _, (old, _) = self._cache.popitem(last=False)
            old.close()
        return slide, grid

    def close(self) -> None:
        """Close every slide this process holds open."""
        while self._cache:
            _, (slide, _) = self._cache.popitem()
            slide.close()

    def _read(self, slide: Any, grid: Any, idx: np.ndarray) -> np.ndarray:
        """Tiles at grid positions ``idx`` (duplicates allowed), in the order of ``idx``."""
        uniq = np.unique(idx)
        tiles, got = [], []
        for b in read_tiles(slide, grid, batch_size=len(uniq), read_threads=1, indices=uniq):
            tiles.append(b.tiles)
            got.append(np.asarray(b.indices))
        all_tiles = np.concatenate(tiles)
        all_idx = np.concatenate(got)
        order = np.argsort(all_idx, kind="stable")  # read order may vary; make it canonical
        all_tiles, all_idx = all_tiles[order], all_idx[order]
        return all_tiles[np.searchsorted(all_idx, idx)]

    # -- iteration -------------------------------------------------------------------------
    def _batch(self, rng: np.random.Generator) -> np.ndarray:
        out: list[np.ndarray] = []
        n = 0
        tries = 0
        while n < self.batch_size:
            tries += 1
            if len(self._bad) == len(self.slides) or tries > 50 * len(self.slides) + 100:
                raise InputError(
                    f"none of the {len(self.slides)} slides gives tissue tiles at "
                    f"mpp={self.mpp} tile_size={self.tile_size} min_tissue={self.min_tissue} "
                    "(unreadable, no MPP, or no tissue); see the warnings above, or lower "
                    "min_tissue / pass assume_mpp."
                )
            i = int(rng.integers(len(self.slides)))
            opened = self._open(i)
            if opened is None:
                continue
            slide, grid = opened
            k = min(self.tiles_per_slide, self.batch_size - n)
            idx = rng.choice(len(grid), size=k, replace=len(grid) < k)
            tiles = self._read(slide, grid, idx)
            out.append(tiles)
            n += len(tiles)
        batch = np.concatenate(out)[: self.batch_size]
        batch = batch[rng.permutation(len(batch))]
        return batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches round-robin from its workers: worker w makes batches
        # w, w + nw, ...; the stream depends on (seed, epoch, number of workers), never on timing.
        n_mine = len(range(wid, self.batches_per_epoch, nw))
        rng = np.random.default_rng([self.seed, self.epoch, wid, nw])
        for _ in range(n_mine):
            batch = self._batch(rng)
            yield torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))


def make_tile_loader(dataset: TileSSLDataset, *, num_workers: int = 0,
                     pin_memory: bool = False, prefetch: int = 2):
    """A DataLoader over a :class:`TileSSLDataset` (batches come ready-made: ``batch_size=None``).

    Memory is bounded by ``num_workers * prefetch`` batches in flight plus each worker's
    ``max_open_slides`` open slides.
    """
    validate_params("make_tile_loader", {"num_workers": num_workers},
                    {"num_workers": [Interval(int, 0, None)]})
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = {"prefetch_factor": max(1, int(prefetch)), "persistent_workers": False,
              "multiprocessing_context": _mp_context()}
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      **kw)


def _mp_context() -> str | None:
    # fork is fast and keeps the parent's imports, but is unsafe once CUDA or many threads are
    # initialised; forkserver is the safe default on Linux, spawn elsewhere.
    methods = mp.get_all_start_methods()
    return "forkserver" if "forkserver" in methods else None


def steps_for(tiles_per_epoch: int, batch_size: int) -> int:
    """Number of optimisation steps for ``tiles_per_epoch`` tiles (at least one)."""
    return max(1, math.ceil(int(tiles_per_epoch) / int(batch_size)))
