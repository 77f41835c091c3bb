"""The per-slide task of :func:`wsi_ssl.tiling.embed_slides`, run on dask workers or in-process.

One task = one slide, in two steps:

- :func:`prepare_slide`: open it, build the grid, plan the Giga-SSL view bank (fixed per-slide
  work on the CPU). In-process runs (:func:`run_jobs`) prepare the next slide in a thread while
  the current one is encoded, so the device does not wait for it.
- :func:`encode_slide`: a reader thread reads and decodes tiles a few batches ahead of the
  encoder (a bounded queue), so the encoder never waits for I/O. Tiles are read once: the view
  tiles are augmented from the same batches as the plain features. On a GPU the uint8 tiles go
  to the device from pinned memory (``non_blocking``), and resizing, normalisation and the
  view-bank augmentations run there; on the CPU the reader thread augments while the encoder
  runs.

Each worker process builds the encoder once (cached by fingerprint) and keeps it across slides;
the driver never builds it. Tasks return a :class:`SlideResult` (numpy arrays) or a
:class:`SlideFailure`; the driver writes the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import queue
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from wsi_ssl._utils import release_free_memory, resolve_device
from wsi_ssl.augment import apply_params, sample_params
from wsi_ssl.encoders import encoder_from_spec, spec_fingerprint
from wsi_ssl.errors import EncoderMismatchError, InputError, MissingMPPError, WsiSslError
from wsi_ssl.tiling._cluster import worker_device
from wsi_ssl.tiling._grid import tile_grid
from wsi_ssl.tiling._read import read_tiles
from wsi_ssl.tiling._slide import open_slide

if TYPE_CHECKING:
    from wsi_ssl.tiling._embed import EmbedConfig

__all__ = ["run_job", "run_jobs", "seed_for", "prepare_slide", "encode_slide", "EncoderPayload",
           "SlideResult", "SlideFailure", "PreparedSlide"]

logger = logging.getLogger(__name__)

_WORKER_ENCODERS: dict[str, Any] = {}  # fingerprint -> TileEncoder, one per worker process
_WORKER_ERRORS: dict[str, Exception] = {}  # fingerprint -> why it cannot be built here
_WORKER_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class EncoderPayload:
    """How a worker gets the encoder (never the model itself: it is built on the worker).

    Attributes:
        fingerprint: the fingerprint the store is bound to.
        kind: ``"spec"``: ``fingerprint`` is the spec fingerprint
            (:func:`~wsi_ssl.encoders.spec_fingerprint`); ``"model"``: the model's own
            fingerprint (stores made before spec fingerprints, wrapped modules).
        spec: ``TileEncoder.spec`` to build from (``None`` for a wrapped module).
        pickled: the cloudpickled wrapped module (``spec`` is ``None``).
        device: ``embed_slides(device=)``; ``"auto"`` resolves on the worker.
        torch_threads: torch threads to use on the worker (``None``: leave torch's default).
    """

    fingerprint: str
    kind: Literal["spec", "model"] = "spec"
    spec: dict[str, Any] | None = None
    pickled: bytes | None = None
    device: str = "auto"
    torch_threads: int | None = None


@dataclass(frozen=True, kw_only=True)
class SlideResult:
    """One embedded slide, as a worker returns it.

    Attributes:
        slide_id: the slide's id.
        features: ``(N, D)`` tile features (stored dtype); coords: ``(N, 2)`` level-0 ``(x, y)``.
        views: ``(V, T, D)`` view-bank features; view_index: ``(V, T)`` grid indices.
        info: slide facts for the store attrs (backend, slide µm/px, level, ...).
        seconds: time the worker spent on the slide.
        worker: where it ran (host, pid, ``CUDA_VISIBLE_DEVICES``, device).
    """

    slide_id: str
    features: np.ndarray
    coords: np.ndarray
    views: np.ndarray
    view_index: np.ndarray
    info: dict[str, Any]
    seconds: float = 0.0
    worker: str = ""


@dataclass(frozen=True, kw_only=True)
class SlideFailure:
    """A slide that failed: ``error`` is one line ``"ErrorType: message"``."""

    slide_id: str
    error: str
    worker: str = ""


@dataclass(kw_only=True)
class PreparedSlide:
    """A slide opened, gridded and with its view bank planned (close ``slide`` when done)."""

    job: dict[str, Any]
    slide: Any
    grid: Any
    view_index: np.ndarray
    params: list[Any] = field(default_factory=list)
    t0: float = 0.0


def seed_for(seed: int, slide_id: str) -> list[int]:
    """The entropy of a slide's view-bank rng: ``[seed, first 8 bytes of sha256(slide_id)]``."""
    h = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return [int(seed), h]


def _where(device: Any = None) -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (f"{socket.gethostname()} pid={os.getpid()}"
            + (f" CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else "")
            + (f" device={device}" if device is not None else ""))


def _worker_encoder(payload: EncoderPayload):
    """This process's encoder for ``payload``: built once, kept across slides (an encoder
    that cannot be built here fails every later slide at once, without loading it again)."""
    fp = payload.fingerprint
    with _WORKER_LOCK:
        enc = _WORKER_ENCODERS.get(fp)
        if enc is None and fp in _WORKER_ERRORS:  # tried once: do not reload big weights per slide
            raise _WORKER_ERRORS[fp]
        if enc is None:
            try:
                enc = _build_encoder(payload)
            except WsiSslError as err:
                _WORKER_ERRORS.clear()
                _WORKER_ERRORS[fp] = err
                raise
            _WORKER_ENCODERS.clear()  # one encoder per worker process at a time
            _WORKER_ENCODERS[fp] = enc
        threads = payload.torch_threads
        if threads:
            if torch.get_num_threads() != threads:
                torch.set_num_threads(int(threads))
    return enc


def _build_encoder(payload: EncoderPayload):
    """Build the encoder of ``payload`` on this process's device, checking its fingerprint."""
    fp = payload.fingerprint
    device = worker_device(payload.device)
    if payload.spec is not None:
        if payload.kind == "model":
            return encoder_from_spec(payload.spec, fp, device=device)
        here = spec_fingerprint(payload.spec)  # hashes the weights file seen here
        if here != fp:
            raise EncoderMismatchError(
                f"encoder {payload.spec.get('name')!r} on host {socket.gethostname()} has "
                f"fingerprint {here}, expected {fp}: the weights file "
                f"'{payload.spec.get('weights')}' differs here (or the timm version); use the "
                "same files and versions everywhere.")
        return encoder_from_spec(payload.spec, None, device=device)
    if payload.pickled is not None:
        enc = pickle.loads(payload.pickled)
        return enc.to_device(device)
    raise EncoderMismatchError(f"no encoder was sent for fingerprint {fp}.")


def _require_visible(path: str) -> None:
    """The driver saw the file (it checks first); a worker that does not is on another host."""
    if not os.path.exists(path):
        raise InputError(
            f"slide file '{path}' is not visible on the worker on host {socket.gethostname()} "
            f"(working directory '{os.getcwd()}'); every dask worker must see the slides at the "
            "same absolute path (a shared filesystem mounted alike on all hosts), or run "
            "without --scheduler.")


def _open(job: dict[str, Any], config: EmbedConfig):
    backend = config.backend
    if job.get("slide_mpp") is not None:
        return open_slide(job["path"], backend=backend, slide_mpp=job["slide_mpp"])
    slide = open_slide(job["path"], backend=backend)
    try:
        slide.slide_mpp  # noqa: B018 - raises MissingMPPError when absent
    except MissingMPPError:
        slide.close()
        if config.assume_mpp is None:
            raise
        slide = open_slide(job["path"], backend=backend, slide_mpp=config.assume_mpp)
    return slide


def _plan_views(n: int, slide_id: str, config: EmbedConfig):
    """Per version: ``T`` grid indices (with replacement when ``n < T``) and one augmentation
    draw, from an rng seeded by (seed, slide_id): a rerun reproduces the bank exactly."""
    V, T = config.views, config.view_tiles
    if V == 0 or n == 0:
        return np.zeros((0, 0), np.int64), []
    rng = np.random.default_rng(seed_for(config.seed, slide_id))
    index = np.empty((V, T), np.int64)
    params = []
    for v in range(V):
        index[v] = rng.choice(n, size=T, replace=n < T)
        params.append(sample_params(rng, config.augment_config))
    return index, params


def prepare_slide(job: dict[str, Any], config: EmbedConfig) -> PreparedSlide:
    """Open ``job``'s slide, build its grid and plan its view bank (CPU work, no encoder)."""
    t0 = time.perf_counter()
    _require_visible(job["path"])
    slide = _open(job, config)
    try:
        grid = tile_grid(slide, mpp=config.mpp, tile_size=config.tile_size,
                         overlap=config.overlap, min_tissue=config.min_tissue)
        view_index, params = _plan_views(len(grid), job["slide_id"], config)
    except BaseException:
        slide.close()
        raise
    return PreparedSlide(job=job, slide=slide, grid=grid, view_index=view_index, params=params,
                         t0=t0)


class _ViewBatches:
    """Collects augmented view tiles (any size per call) into encoder batches of ``bs``."""

    def __init__(self, bs: int) -> None:
        self.bs = bs
        self._x: list[Any] = []
        self._pos: list[np.ndarray] = []

    def add(self, x: Any, pos: np.ndarray) -> None:
        self._x.append(x)
        self._pos.append(pos)

    def take(self, force: bool) -> Iterator[tuple[Any, np.ndarray]]:
        """Full batches (and, with ``force``, the remainder)."""
        if not self._x:
            return
        x, pos = torch.cat(self._x), np.concatenate(self._pos)
        self._x.clear()
        self._pos.clear()
        start, bs = 0, self.bs
        while len(pos) - start >= bs or (force and start < len(pos)):
            yield x[start:start + bs], pos[start:start + bs]
            start += bs
        if start < len(pos):
            self._x.append(x[start:])
            self._pos.append(pos[start:])


def _producer(prep: PreparedSlide, config: EmbedConfig, out_size: int, on_device: bool,
              q: queue.Queue, stop: threading.Event) -> None:
    """Read/decode tiles and put work items on ``q``: ``("features", uint8 tiles, idx)`` and,
    for the view bank, augmented ``("views", float tiles, pos)`` (CPU) or the raw
    ``("view_tiles", uint8 NHWC tiles, (versions, pos))`` to augment on the device."""
    pin = on_device and torch.cuda.is_available()
    view_index = prep.view_index
    flat = view_index.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_idx = flat[order]
    T = max(1, view_index.shape[1]) if view_index.size else 1
    batches = _ViewBatches(config.batch_size)
    try:
        for batch in read_tiles(prep.slide, prep.grid, batch_size=config.batch_size,
                                read_threads=config.read_threads):
            if stop.is_set():
                return
            idx = np.asarray(batch.indices, np.int64)
            tiles = torch.from_numpy(np.ascontiguousarray(batch.tiles))
            if pin:
                tiles = tiles.pin_memory()  # the host->device copy can then run asynchronously
            q.put(("features", tiles, idx))
            if not sorted_idx.size:
                continue
            lo = np.searchsorted(sorted_idx, idx, "left")
            hi = np.searchsorted(sorted_idx, idx, "right")
            hits = [(b, order[lo[b]:hi[b]]) for b in range(len(idx)) if hi[b] > lo[b]]
            if not hits:
                continue
            rows = np.concatenate([np.full(len(f), b) for b, f in hits])
            flat_pos = np.concatenate([f for _, f in hits])
            versions = flat_pos // T
            if on_device:  # unique tiles only; the consumer augments them on the device
                uniq, inverse = np.unique(rows, return_inverse=True)
                sub = tiles[torch.from_numpy(uniq)]
                q.put(("view_tiles", sub.pin_memory() if pin else sub,
                       (inverse, versions, flat_pos)))
                continue
            t_all = tiles.permute(0, 3, 1, 2)
            for v in np.unique(versions):
                sel = versions == v
                batches.add(apply_params(t_all[rows[sel]], prep.params[int(v)],
                                         out_size=out_size), flat_pos[sel])
            for x, pos in batches.take(False):
                q.put(("views", x, pos))
        for x, pos in batches.take(True):
            q.put(("views", x, pos))
        q.put(("end", None, None))
    except BaseException as err:  # noqa: BLE001 - handed to the consumer
        q.put(("error", err, None))


def _augment_on_device(enc: Any) -> bool:
    """Whether the view-bank augmentations run on the encoder's device (a GPU) instead of in
    the reader thread (on the CPU the reader thread augments while the encoder runs)."""
    return enc.device.type != "cpu"


def encode_slide(prep: PreparedSlide, enc: Any, config: EmbedConfig) -> SlideResult:
    """Encode a prepared slide's tiles and view bank (closes the slide)."""
    job, slide, grid = prep.job, prep.slide, prep.grid
    with slide:
        n, d = len(grid), enc.embed_dim
        features = np.zeros((n, d), np.float32)
        views = np.zeros(prep.view_index.shape + (d,), np.float32)
        if n:
            with _reader(prep, config, enc) as q:
                _consume(q, prep, enc, config.batch_size, features, views.reshape(-1, d))
        slide_mpp = float(slide.slide_mpp)
        info = {"backend": slide.backend, "slide_mpp": slide_mpp,
                "mpp_assumed": bool(getattr(slide, "mpp_assumed", False)),
                "slide_dimensions": [int(v) for v in slide.dimensions]}
    info.update(level=int(grid.level), read_size=int(grid.read_size),
                stride_level0=float(grid.stride_level0),
                tile_size_level0=int(round(config.tile_size * config.mpp / slide_mpp)))
    np_dt = np.float16 if config.dtype == "float16" else np.float32
    return SlideResult(slide_id=job["slide_id"], features=features.astype(np_dt),
                       coords=np.asarray(grid.coords, np.int64), views=views.astype(np_dt),
                       view_index=prep.view_index, info=info,
                       seconds=time.perf_counter() - prep.t0, worker=_where(enc.device))


@contextlib.contextmanager
def _reader(prep: PreparedSlide, config: EmbedConfig, enc: Any) -> Iterator[queue.Queue]:
    """The slide's reader thread (:func:`_producer`) feeding a bounded queue; on exit it is
    stopped, drained and joined (nothing of the slide outlives this block)."""
    q: queue.Queue = queue.Queue(maxsize=config.prefetch)
    stop = threading.Event()
    th = threading.Thread(target=_producer, args=(prep, config, enc.input_size,
                                                  _augment_on_device(enc), q, stop),
                          name=f"wsi-ssl-read-{prep.job['slide_id']}", daemon=True)
    th.start()
    try:
        yield q
    finally:
        stop.set()
        while th.is_alive():  # drain so the producer can finish
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        th.join()


def _consume(q: queue.Queue, prep: PreparedSlide, enc: Any, batch_size: int,
             features: np.ndarray, flat_views: np.ndarray) -> None:
    """Encode the reader's work items into ``features`` and ``flat_views`` (``(V*T, D)``)
    until its ``"end"``; a reader error is raised here."""
    device_views = _ViewBatches(batch_size)
    while True:
        kind, x, pos = q.get()
        if kind == "end":
            for xv, pv in device_views.take(True):
                flat_views[pv] = enc.embed(xv).numpy()
            return
        if kind == "error":
            raise x
        if kind == "features":
            features[pos] = enc.embed(x).numpy()
        elif kind == "views":
            flat_views[pos] = enc.embed(x).numpy()
        else:  # "view_tiles": augment on the device, then encode in full batches
            inverse, versions, flat_pos = pos
            t_dev = x.to(enc.device, non_blocking=True).permute(0, 3, 1, 2)
            for v in np.unique(versions):
                sel = versions == v
                device_views.add(apply_params(t_dev[inverse[sel]], prep.params[int(v)],
                                              out_size=enc.input_size), flat_pos[sel])
            for xv, pv in device_views.take(False):
                flat_views[pv] = enc.embed(xv).numpy()


def _encode_prepared(prep: PreparedSlide, payload: EncoderPayload, config: EmbedConfig,
                     encoder: Any = None) -> SlideResult:
    try:
        enc = encoder if encoder is not None else _worker_encoder(payload)
    except BaseException:
        prep.slide.close()
        raise
    return encode_slide(prep, enc, config)


def _failure(job: dict[str, Any], err: BaseException) -> SlideFailure:
    logger.warning("slide '%s' failed: %s", job["path"], err)
    return SlideFailure(slide_id=job["slide_id"], error=f"{type(err).__name__}: {err}",
                        worker=_where())


def run_job(job: dict[str, Any], payload: EncoderPayload, config: EmbedConfig
            ) -> SlideResult | SlideFailure:
    """Task body (one slide): errors come back as data so one bad slide never kills the run."""
    try:
        return _encode_prepared(prepare_slide(job, config), payload, config)
    except Exception as err:  # noqa: BLE001 - recorded per slide
        return _failure(job, err)
    finally:  # a worker's memory stays flat over thousands of slides
        release_free_memory()


def run_jobs(jobs: Iterable[dict[str, Any]], payload: EncoderPayload, config: EmbedConfig, *,
             encoder: Any = None) -> Iterator[tuple[dict[str, Any], SlideResult | SlideFailure]]:
    """In-process: the slides in order, the next one opened and gridded in a thread while the
    current one is encoded. Yields ``(job, result)``.

    Args:
        encoder: a ``TileEncoder`` given to ``embed_slides``: used as it is when it already
            sits on the device ``config.device`` resolves to (else built from ``payload``).

    Raises:
        WsiSslError: the encoder cannot be built (bad weights...): the run stops with that
            one error instead of recording it for every slide.
    """
    jobs = list(jobs)
    if not jobs:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="wsi-ssl-prepare") as pool:
        pending: Future | None = pool.submit(prepare_slide, jobs[0], config)
        try:
            if encoder is None or encoder.device != resolve_device(worker_device(config.device)):
                # built while the first slide is prepared; in this process a bad encoder
                # stops the run with its one error
                encoder = _worker_encoder(payload)
            for i, job in enumerate(jobs):
                cur = pending
                pending = (pool.submit(prepare_slide, jobs[i + 1], config)
                           if i + 1 < len(jobs) else None)
                try:
                    res: SlideResult | SlideFailure = _encode_prepared(
                        cur.result(), payload, config, encoder)
                except Exception as err:  # noqa: BLE001 - recorded per slide
                    res = _failure(job, err)
                del cur
                yield job, res
                del res
                release_free_memory()  # memory stays flat over a cohort (no arena growth)
        finally:  # stopped early: close the slide prepared ahead
            if pending is not None and not pending.cancel() and pending.exception() is None:
                pending.result().slide.close()
