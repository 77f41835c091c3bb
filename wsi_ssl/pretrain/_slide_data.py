"""Data side of slide-level contrastive pretraining (Giga-SSL), streamed from a
:class:`~wsi_ssl.store.TileStore`.

* **Setup** (:func:`load_cohort`) reads slide *metadata only* (``TileStore.slide_stats``: tile
  count, bank shape, finiteness, per-dimension sums): the feature mean/std, the slides to skip
  (no tiles) or exclude (non-finite values) and the bank size come from it.
* **Each step** is planned in the main process from the seed (:func:`plan_step`: the version and
  the tiles of every view, the coordinate-augmentation draws). Readers (:class:`ViewReader`, run
  ahead of the model by :func:`ordered_map` in threads) fetch only those versions' chunks
  (``TileStore.read_views``) and, for heads that read coordinates, the slide's coordinates through
  a cache bounded in bytes (:class:`CoordsCache`). Clean features are never read in training.
  A batch depends only on its plan, so 0, 1 or N readers give bit-identical batches.
* **Inference** reads features (and coordinates when the head reads them) slide by slide, ahead
  of the model, with the same :func:`ordered_map`.

Coordinates handed to heads are in **grid units**: level-0 pixels ``(x, y)`` divided by the
tiling's ``stride_level0`` (read from the slide's attrs, else inferred from the coordinates).

Reference: Lazard et al., "Giga-SSL: Self-Supervised Learning for Gigapixel Images", CVPRW 2023.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from wsi_ssl._validation import Interval, Pair, validate_params
from wsi_ssl.errors import InputError, StoreFormatError
from wsi_ssl.mil import grid_stride, to_grid_units

__all__ = ["CoordAugment", "augment_coords", "SlideCohort", "load_cohort", "StepPlan",
           "plan_step", "CoordsCache", "ViewReader", "ReadStats", "ordered_map",
           "head_reads_coords", "grid_stride"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass(frozen=True, kw_only=True)
class CoordAugment:
    """Augmentation of the tile coordinates of one view (for coordinate-aware heads).

    Giga-SSL augments the positions of the sampled tiles so that a sparse-convolution head cannot
    recognise a slide by its absolute layout. One draw per view: a rotation about the centroid,
    random flips of each axis, a per-axis scale and a translation; the result is shifted to be
    non-negative.

    Attributes:
        rotate: rotate by an angle uniform in [0, 2 pi).
        flip: flip x and y, each with probability 1/2.
        scale: per-axis scale range (paper: 0.7-1.3).
        translate: maximum translation in grid units (uniform in [0, translate] per axis).
    """

    rotate: bool = True
    flip: bool = True
    scale: tuple[float, float] = (0.7, 1.3)
    translate: float = 16.0

    def __post_init__(self) -> None:
        validate_params("CoordAugment", asdict(self), _COORD_AUGMENT_CONSTRAINTS)
        object.__setattr__(self, "scale", tuple(float(v) for v in self.scale))


_COORD_AUGMENT_CONSTRAINTS: dict[str, list[Any]] = {
    "rotate": [bool],
    "flip": [bool],
    "scale": [Pair(Interval(float, 0, None, closed="neither"))],
    "translate": [Interval(float, 0, None)],
}


@dataclass(frozen=True)
class CoordDraw:
    """The random part of one view's coordinate augmentation (drawn in the main process).

    Attributes:
        angle: rotation angle in radians (None: no rotation).
        sign: ``(2,)`` -1/+1 per axis (None: no flips).
        scale: ``(2,)`` per-axis scale.
        shift: ``(2,)`` translation in grid units (None: none).
    """

    angle: float | None
    sign: np.ndarray | None
    scale: np.ndarray
    shift: np.ndarray | None


def draw_coord_aug(rng: np.random.Generator, cfg: CoordAugment) -> CoordDraw:
    """Draw one view's augmentation (the draws of :func:`augment_coords`, in its order)."""
    angle = float(rng.uniform(0.0, 2.0 * np.pi)) if cfg.rotate else None
    sign = np.where(rng.random(2) < 0.5, -1.0, 1.0) if cfg.flip else None
    lo, hi = cfg.scale
    scale = rng.uniform(lo, hi, size=2)
    shift = rng.uniform(0.0, cfg.translate, size=2) if cfg.translate > 0 else None
    return CoordDraw(angle, sign, scale, shift)


def apply_coord_aug(coords: np.ndarray, draw: CoordDraw) -> np.ndarray:
    """Apply a drawn augmentation: rotate about the centroid, flip, scale, shift to >= 0,
    translate.

    Shape:
        coords: ``(k, 2)`` float; returns ``(k, 2)`` float32, all values >= 0.
    """
    c = np.asarray(coords, dtype=np.float64)
    c = c - c.mean(axis=0, keepdims=True)
    if draw.angle is not None:
        a = draw.angle
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        c = c @ rot.T
    if draw.sign is not None:
        c = c * draw.sign
    c = c * draw.scale
    c = c - c.min(axis=0, keepdims=True)
    if draw.shift is not None:
        c = c + draw.shift
    return c.astype(np.float32)


def augment_coords(coords: np.ndarray, rng: np.random.Generator, cfg: CoordAugment) -> np.ndarray:
    """Augment the coordinates of one view (one random draw for all its tiles).

    Args:
        coords: tile positions in grid units.
        rng: the random generator (consumed deterministically).
        cfg: what to apply.

    Shape:
        coords: ``(k, 2)`` float; returns ``(k, 2)`` float32, all values >= 0.
    """
    return apply_coord_aug(coords, draw_coord_aug(rng, cfg))


def store_slide_ids(store: Any, slide_ids: Sequence[str] | None) -> list[str]:
    """``slide_ids`` checked against the store's complete slides (all of them when ``None``)."""
    ids = list(store.slide_ids) if slide_ids is None else [str(s) for s in slide_ids]
    if slide_ids is not None:
        known = set(store.slide_ids)
        missing = [s for s in ids if s not in known]
        if missing:
            raise InputError(f"{len(missing)} slide ids are not complete slides of the store, "
                             f"e.g. {missing[:5]}; see TileStore.slide_ids.")
    return ids


# -- setup: metadata only ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SlideCohort:
    """The slides a slide-SSL run trains on, from their stored statistics (no array read).

    Attributes:
        slide_ids: the slides used, in store order.
        skipped: slides without tiles (left out with a warning).
        excluded: slides whose features or views are not all finite (left out with a warning).
        n_versions, view_tiles: ``(n,)`` bank shape ``V``, ``T`` of each used slide.
        dim: tile feature dimension ``D``.
        mean, std: ``(D,)`` float32 per-dimension mean and ``sqrt(var + 1e-6)`` of the clean
            features of the used slides (all their tiles).
        store: path of the store (for messages).
    """

    slide_ids: tuple[str, ...]
    skipped: tuple[str, ...]
    excluded: tuple[str, ...]
    n_versions: np.ndarray
    view_tiles: np.ndarray
    dim: int
    mean: np.ndarray
    std: np.ndarray
    store: str = ""

    def __len__(self) -> int:
        return len(self.slide_ids)

    @property
    def bank_tiles(self) -> int:
        """Tiles per augmented version of the bank (the largest ``T`` among the slides; the
        embedding gives every slide the same ``T``)."""
        return int(self.view_tiles.max())

    def warn_small_views(self, tiles_per_view: int) -> None:
        """Warn about slides whose versions hold fewer than ``tiles_per_view`` tiles (sampled
        with replacement)."""
        few = [f"{s} ({int(t)})" for s, t in zip(self.slide_ids, self.view_tiles, strict=True)
               if t < tiles_per_view]
        if few:
            warnings.warn(f"{len(few)} slide(s) have fewer than {tiles_per_view} tiles per view, "
                          f"views sample them with replacement: {few[:10]}", UserWarning,
                          stacklevel=3)


def load_cohort(store: Any, slide_ids: Sequence[str] | None = None) -> SlideCohort:
    """The slides of ``store`` usable for slide SSL and the feature mean/std, from
    ``store.slide_stats`` (metadata; a slide without stored statistics has them computed once by
    the store).

    Raises:
        InputError: no complete slide, or every selected slide is empty or non-finite.
        StoreFormatError: slides of different dimensions, or slides without a view bank.
    """
    where = str(getattr(store, "path", store))
    ids = store_slide_ids(store, slide_ids)
    if not ids:
        raise InputError(f"tile store '{where}' has no complete slides; embed some slides first "
                         "(`wsi-ssl embed`).")
    kept: list[str] = []
    skipped: list[str] = []
    excluded: list[str] = []
    no_views: list[str] = []
    n_versions: list[int] = []
    view_tiles: list[int] = []
    dim: int | None = None
    total = sq = np.zeros(0)
    n_tiles = 0
    for sid in ids:
        st = store.slide_stats(sid)
        if st.n_tiles == 0:
            skipped.append(sid)
            continue
        if dim is None:
            dim = int(st.dim)
            total, sq = np.zeros(dim), np.zeros(dim)
        elif st.dim != dim:
            raise StoreFormatError(f"slide '{sid}' of '{where}' has {st.dim}-d features, the "
                                   f"others {dim}-d; one store holds one encoder.")
        if st.n_views == 0 or st.view_tiles == 0:
            no_views.append(sid)
            continue
        if not st.all_finite:
            excluded.append(sid)
            continue
        total = total + np.asarray(st.features_sum, np.float64)
        sq = sq + np.asarray(st.features_sumsq, np.float64)
        n_tiles += int(st.n_tiles)
        kept.append(sid)
        n_versions.append(int(st.n_views))
        view_tiles.append(int(st.view_tiles))
    _check_left_out(where, kept, skipped, excluded, no_views)
    mean = total / n_tiles
    var = np.maximum(sq / n_tiles - mean * mean, 0.0)
    return SlideCohort(tuple(kept), tuple(skipped), tuple(excluded),
                       np.asarray(n_versions, np.int64), np.asarray(view_tiles, np.int64),
                       int(dim), mean.astype(np.float32),  # type: ignore[arg-type]
                       np.sqrt(var + 1e-6).astype(np.float32), where)


def _check_left_out(where: str, kept: list[str], skipped: list[str], excluded: list[str],
                    no_views: list[str]) -> None:
    """Refuse slides without a view bank and an empty selection; warn about the slides left
    out (empty, non-finite)."""
    if no_views:
        raise StoreFormatError(
            f"tile store '{where}' has no augmentation view bank for {len(no_views)} slide(s), "
            f"e.g. {no_views[:3]}; slide SSL trains on the Giga-SSL shared-augmentation views: "
            "re-run the embedding with views (`wsi-ssl embed ... --views N`, or "
            "embed_slides(..., views=N)).")
    if skipped:
        warnings.warn(f"skipping {len(skipped)} slide(s) without tiles: {skipped[:10]}",
                      UserWarning, stacklevel=4)
    if excluded:
        warnings.warn(f"excluding {len(excluded)} slide(s) whose tile features or views hold "
                      f"NaN/inf values (per their stored statistics): {excluded[:10]}; re-embed "
                      "them (or drop them from the store) to train on them.", UserWarning,
                      stacklevel=4)
    if not kept:
        raise InputError(f"tile store '{where}': every selected slide is empty or non-finite; "
                         "nothing to use.")


# -- per-step plans (main process) ------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """What one training step reads and how it samples (decided in the main process).

    Attributes:
        slides: positions in :attr:`SlideCohort.slide_ids` of the batch's slides.
        versions: ``(n_views, B)`` augmented version of each view.
        tiles: ``(n_views, B, k)`` rows of the version sampled by each view (with replacement).
        coord_draws: per view, per slide, the coordinate augmentation (None: not augmented).
    """

    slides: np.ndarray
    versions: np.ndarray
    tiles: np.ndarray
    coord_draws: tuple[tuple[CoordDraw, ...], ...] | None


def plan_step(rng: np.random.Generator, slides: Sequence[int] | np.ndarray, cohort: SlideCohort,
              *, tiles_per_view: int, coord_aug: CoordAugment | None,
              n_views: int = 2) -> StepPlan:
    """``n_views`` views of each slide of a batch: one augmented version at random and
    ``tiles_per_view`` of its tiles with replacement (Giga-SSL), plus the
    coordinate-augmentation draws. The draws are made per slide, view after view, in the order
    of the reference implementation, so that the same seed gives the same batches as before
    streaming."""
    slides = np.asarray(slides, np.int64)
    b = len(slides)
    versions = np.empty((n_views, b), np.int64)
    tiles = np.empty((n_views, b, tiles_per_view), np.int64)
    draws: list[list[CoordDraw]] = [[] for _ in range(n_views)]
    for j, pos in enumerate(slides):
        n_ver, t = int(cohort.n_versions[pos]), int(cohort.view_tiles[pos])
        for v in range(n_views):
            versions[v, j] = int(rng.integers(n_ver))
            tiles[v, j] = rng.integers(0, t, size=tiles_per_view)
            if coord_aug is not None:
                draws[v].append(draw_coord_aug(rng, coord_aug))
    return StepPlan(slides, versions, tiles,
                    tuple(tuple(d) for d in draws) if coord_aug is not None else None)


# -- readers ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReadStats:
    """What a run read from the store (logical bytes, i.e. decoded array bytes).

    Attributes:
        view_reads: ``read_views`` calls; versions_read: versions they returned.
        view_bytes: bytes of the versions and their ``view_index`` rows returned.
        coords_reads: coordinate reads (cache misses); coords_bytes: their bytes.
        coords_cache_peak: high-water mark of the coordinate cache, bytes.
    """

    view_reads: int = 0
    versions_read: int = 0
    view_bytes: int = 0
    coords_reads: int = 0
    coords_bytes: int = 0
    coords_cache_peak: int = 0


class CoordsCache:
    """Grid-unit coordinates of slides, read on demand (``read_coords`` and the slide's attrs)
    and kept in an LRU bounded in bytes; thread-safe.

    Args:
        store: the tile store.
        max_bytes: memory budget; a slide larger than it is read every time, never kept.
    """

    def __init__(self, store: Any, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0
        self.n_reads = 0
        self.bytes_read = 0

    def get(self, slide_id: str) -> np.ndarray:
        """``(N, 2)`` float32 grid-unit coordinates of ``slide_id``."""
        with self._lock:
            hit = self._items.get(slide_id)
            if hit is not None:
                self._items.move_to_end(slide_id)
                return hit
        raw = np.asarray(self.store.read_coords(slide_id))
        grid = to_grid_units(raw, self.store.slide_attrs(slide_id) or {})
        with self._lock:
            self.n_reads += 1
            self.bytes_read += int(raw.nbytes)
            if grid.nbytes <= self.max_bytes and slide_id not in self._items:
                self._items[slide_id] = grid
                self.bytes += int(grid.nbytes)
                while self.bytes > self.max_bytes:
                    _, old = self._items.popitem(last=False)
                    self.bytes -= int(old.nbytes)
                self.peak_bytes = max(self.peak_bytes, self.bytes)
        return grid


class ViewReader:
    """Reads the views of a :class:`StepPlan`: per slide of the batch only the bank versions its
    views use (``store.read_views``), and coordinates from a :class:`CoordsCache` when the head
    reads them.

    Args:
        store: the tile store.
        cohort: the run's slides.
        coords: the coordinate cache, or None when the head ignores coordinates.
        pin: allocate batches in pinned (page-locked) memory, for non-blocking copies to CUDA.
    """

    def __init__(self, store: Any, cohort: SlideCohort, coords: CoordsCache | None, *,
                 pin: bool = False) -> None:
        self.store, self.cohort, self.coords, self.pin = store, cohort, coords, pin
        self._lock = threading.Lock()
        self._n = [0, 0, 0]  # read_views calls, versions, bytes

    @property
    def stats(self) -> ReadStats:
        c = self.coords
        return ReadStats(self._n[0], self._n[1], self._n[2], c.n_reads if c else 0,
                         c.bytes_read if c else 0, c.peak_bytes if c else 0)

    def read_step(self, plan: StepPlan) -> tuple[Any, Any]:
        """The batch of ``plan``.

        Shape:
            returns torch float32 ``x`` ``(n_views * B, k, D)`` (view-major: the first ``B``
            rows are the first view of every slide) and ``coords`` ``(n_views * B, k, 2)`` (None
            when the head ignores coordinates).
        """
        n_views, b, k = plan.tiles.shape
        xt = torch.empty((n_views, b, k, self.cohort.dim), dtype=torch.float32,
                         pin_memory=self.pin)
        ct = (torch.empty((n_views, b, k, 2), dtype=torch.float32, pin_memory=self.pin)
              if self.coords is not None else None)
        x, c = xt.numpy(), (ct.numpy() if ct is not None else None)
        for j in range(b):
            self._read_slide(plan, j, x, c)
        return (xt.view(n_views * b, k, -1),
                ct.view(n_views * b, k, 2) if ct is not None else None)

    def _read_slide(self, plan: StepPlan, j: int, x: np.ndarray, c: np.ndarray | None) -> None:
        sid = self.cohort.slide_ids[int(plan.slides[j])]
        wanted = plan.versions[:, j]
        uniq = sorted({int(v) for v in wanted})
        views, vidx = self.store.read_views(sid, uniq)
        views, vidx = np.asarray(views), np.asarray(vidx)
        t = int(self.cohort.view_tiles[int(plan.slides[j])])
        if views.shape != (len(uniq), t, self.cohort.dim) or vidx.shape != (len(uniq), t):
            raise StoreFormatError(
                f"slide '{sid}' of '{self.cohort.store}': read_views({uniq}) returned views "
                f"{views.shape} and view_index {vidx.shape}, its statistics say "
                f"({len(uniq)}, {t}, {self.cohort.dim}); check it with `wsi-ssl info "
                f"{self.cohort.store} --verify`.")
        with self._lock:
            self._n[0] += 1
            self._n[1] += len(uniq)
            self._n[2] += int(views.nbytes + vidx.nbytes)
        grid = self.coords.get(sid) if self.coords is not None else None
        if grid is not None and vidx.size and (vidx.min() < 0 or vidx.max() >= len(grid)):
            raise StoreFormatError(f"slide '{sid}' of '{self.cohort.store}': view_index points "
                                   f"outside its {len(grid)} tiles.")
        pos = {v: i for i, v in enumerate(uniq)}
        for v, ver in enumerate(wanted):
            i, idx = pos[int(ver)], plan.tiles[v, j]
            x[v, j] = views[i, idx]
            if c is not None and grid is not None:
                xy = grid[vidx[i, idx]]
                c[v, j] = (apply_coord_aug(xy, plan.coord_draws[v][j])
                           if plan.coord_draws is not None else xy)


def ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], *, readers: int,
                depth: int | None = None) -> Iterator[_R]:
    """``fn`` over ``items`` in order, computed ahead by ``readers`` threads.

    At most ``depth`` (default ``readers + 1``) results are pending or waiting at any time, so
    memory is bounded whatever the number of items; ``items`` is consumed in the calling thread
    (a plan generator stays deterministic). ``readers=0`` computes each result in the calling
    thread when it is asked for. An exception of ``fn`` is raised in the caller, in order;
    closing the iterator cancels what was not started.
    """
    validate_params("ordered_map", {"readers": readers}, {"readers": [Interval(int, 0, None)]},
                    hint="(0: read in the main thread)")
    if readers == 0:
        for item in items:
            yield fn(item)
        return
    depth = max(1, int(depth if depth is not None else readers + 1))
    it = iter(items)
    pending: deque[Future[_R]] = deque()
    pool = ThreadPoolExecutor(readers, thread_name_prefix="wsi-ssl-reader")
    try:
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            out = pending.popleft().result()
            nxt = next(it, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield out
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END: Any = object()


def head_reads_coords(head: Any, in_dim: int) -> bool:
    """Whether a MIL head's output depends on ``coords``: its ``uses_coords`` flag, else a probe
    (the same 6 tiles with and without positions, eval mode, a local generator; TransMIL-like
    heads read coordinates when given). Reading coordinates is skipped for heads that ignore
    them."""
    if getattr(head, "uses_coords", False):
        return True
    try:
        dev = next(head.parameters()).device
    except StopIteration:
        dev = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, int(in_dim), generator=g).to(dev)
    xy = torch.tensor([[0, 0], [1, 0], [2, 0], [0, 3], [5, 5], [1, 4]], dtype=torch.float32,
                      device=dev)[None]
    was = head.training
    head.eval()
    try:
        with torch.no_grad():
            a = head(x, None, None).embedding
            b = head(x, None, xy).embedding
    finally:
        head.train(was)
    return not torch.equal(a, b)
