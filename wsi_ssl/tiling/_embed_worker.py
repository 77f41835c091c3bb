"""The per-slide task of :func:`wsi_ssl.tiling.embed_slides`, run on dask workers.

One task = one slide: open it, build the grid, plan the Giga-SSL view bank, and read/decode/augment
tiles in a thread that stays a few batches ahead of the encoder (a bounded queue), so the encoder
never waits for I/O. Tiles are read once: the view tiles are augmented from the same batches as
the plain features. Each worker process builds the encoder once (cached by fingerprint).
Returns numpy arrays; the driver writes the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from typing import Any

import numpy as np

from wsi_ssl.errors import InputError, MissingMPPError

__all__ = ["run_job", "seed_for"]

logger = logging.getLogger(__name__)

_WORKER_ENCODERS: dict[str, Any] = {}  # fingerprint -> TileEncoder, one per worker process
_WORKER_LOCK = threading.Lock()


def seed_for(seed: int, slide_id: str) -> list[int]:
    """The entropy of a slide's view-bank rng: ``[seed, first 8 bytes of sha256(slide_id)]``."""
    h = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return [int(seed), h]


def _worker_encoder(payload: dict[str, Any]):
    fp = payload["fingerprint"]
    with _WORKER_LOCK:
        enc = _WORKER_ENCODERS.get(fp)
        if enc is None:
            if payload.get("spec") is not None:
                from wsi_ssl.encoders._registry import encoder_from_spec

                enc = encoder_from_spec(payload["spec"], fp, device=_worker_device(payload))
            else:
                import pickle

                enc = pickle.loads(payload["pickled"])
                enc.to_device(_worker_device(payload))
            _WORKER_ENCODERS.clear()  # one encoder per worker process at a time
            _WORKER_ENCODERS[fp] = enc
        threads = payload.get("torch_threads")
        if threads:
            import torch

            if torch.get_num_threads() != threads:
                torch.set_num_threads(int(threads))
    return enc


def _worker_device(payload: dict[str, Any]) -> str:
    device = payload.get("device", "auto")
    if device != "auto":
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n > 1:  # several GPUs: spread workers over them by worker name
        try:
            from distributed import get_worker

            name = get_worker().name
            idx = int(name) if str(name).isdigit() else abs(hash(name))
            return f"cuda:{idx % n}"
        except (ImportError, ValueError):
            pass
    return "auto"


def _require_visible(path: str) -> None:
    """The driver saw the file (it checks first); a worker that does not is on another host."""
    if not os.path.exists(path):
        import socket

        raise InputError(
            f"slide file '{path}' is not visible on the worker on host {socket.gethostname()} "
            f"(working directory '{os.getcwd()}'); every dask worker must see the slides at the "
            "same absolute path (a shared filesystem mounted alike on all hosts), or run "
            "without --scheduler.")


def _open(job: dict[str, Any], settings: dict[str, Any]):
    from wsi_ssl.tiling import open_slide

    backend = settings["backend"]
    if job.get("mpp") is not None:
        return open_slide(job["path"], backend=backend, mpp=job["mpp"])
    slide = open_slide(job["path"], backend=backend)
    try:
        slide.mpp  # noqa: B018 - raises MissingMPPError when absent
    except MissingMPPError:
        if settings.get("assume_mpp") is None:
            slide.close()
            raise
        slide.close()
        slide = open_slide(job["path"], backend=backend, mpp=settings["assume_mpp"])
    return slide


def _plan_views(n: int, slide_id: str, settings: dict[str, Any]):
    """Per version: ``T`` grid indices (with replacement when ``n < T``) and one augmentation
    draw, from an rng seeded by (seed, slide_id): a rerun reproduces the bank exactly."""
    from wsi_ssl.pretrain.augment import sample_params

    V, T = settings["views"], settings["view_tiles"]
    if V == 0 or n == 0:
        return np.zeros((0, 0), np.int64), []
    rng = np.random.default_rng(seed_for(settings["seed"], slide_id))
    index = np.empty((V, T), np.int64)
    params = []
    for v in range(V):
        index[v] = rng.choice(n, size=T, replace=n < T)
        params.append(sample_params(rng, settings["augment"]))
    return index, params


def _producer(slide, grid, settings, view_index, params, out_size, q, stop):
    """Read/decode tiles and build augmented view batches; put work items on ``q``."""
    import torch

    from wsi_ssl.pretrain.augment import apply_params
    from wsi_ssl.tiling import read_tiles

    bs = settings["batch_size"]
    flat = view_index.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_idx = flat[order]
    T = max(1, view_index.shape[1]) if view_index.size else 1
    pend_x: list[Any] = []
    pend_pos: list[np.ndarray] = []

    def flush(force: bool) -> None:
        if not pend_x:
            return
        x, pos = torch.cat(pend_x), np.concatenate(pend_pos)
        pend_x.clear()
        pend_pos.clear()
        start = 0
        while len(pos) - start >= bs or (force and start < len(pos)):
            q.put(("views", x[start:start + bs], pos[start:start + bs]))
            start += bs
        if start < len(pos):
            pend_x.append(x[start:])
            pend_pos.append(pos[start:])

    try:
        for batch in read_tiles(slide, grid, batch_size=bs, num_workers=settings["read_threads"]):
            if stop.is_set():
                return
            tiles, idx = batch.tiles, np.asarray(batch.indices, np.int64)
            q.put(("features", tiles, idx))
            if sorted_idx.size:
                lo = np.searchsorted(sorted_idx, idx, "left")
                hi = np.searchsorted(sorted_idx, idx, "right")
                hits = [(b, order[lo[b]:hi[b]]) for b in range(len(idx)) if hi[b] > lo[b]]
                if hits:
                    rows = np.concatenate([np.full(len(f), b) for b, f in hits])
                    flat_pos = np.concatenate([f for _, f in hits])
                    versions = flat_pos // T
                    t_all = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
                    for v in np.unique(versions):
                        sel = versions == v
                        x = apply_params(t_all[rows[sel]], params[int(v)], out_size=out_size)
                        pend_x.append(x)
                        pend_pos.append(flat_pos[sel])
                    flush(False)
        flush(True)
        q.put(("end", None, None))
    except BaseException as err:  # noqa: BLE001 - handed to the consumer
        q.put(("error", err, None))


def _embed_one(job: dict[str, Any], payload: dict[str, Any], settings: dict[str, Any]
               ) -> dict[str, Any]:
    """One slide, on a worker: open, grid, read ahead in a thread, encode. Returns arrays."""
    from wsi_ssl.tiling import tile_grid

    t0 = time.perf_counter()
    _require_visible(job["path"])
    enc = _worker_encoder(payload)
    with _open(job, settings) as slide:
        grid = tile_grid(slide, mpp=settings["mpp"], tile_size=settings["tile_size"],
                         overlap=settings["overlap"], min_tissue=settings["min_tissue"])
        n, d = len(grid), enc.embed_dim
        view_index, params = _plan_views(n, job["slide_id"], settings)
        features = np.zeros((n, d), np.float32)
        views = np.zeros(view_index.shape + (d,), np.float32)
        flat_views = views.reshape(-1, d)
        if n:
            q: queue.Queue = queue.Queue(maxsize=settings["prefetch"])
            stop = threading.Event()
            th = threading.Thread(target=_producer, args=(slide, grid, settings, view_index,
                                                          params, enc.input_size, q, stop),
                                  name=f"wsi-ssl-read-{job['slide_id']}", daemon=True)
            th.start()
            try:
                while True:
                    kind, x, pos = q.get()
                    if kind == "end":
                        break
                    if kind == "error":
                        raise x
                    out = enc.embed(x).numpy()
                    if kind == "features":
                        features[pos] = out
                    else:
                        flat_views[pos] = out
            finally:
                stop.set()
                while th.is_alive():  # drain so the producer can finish
                    try:
                        q.get(timeout=0.1)
                    except queue.Empty:
                        pass
                th.join()
        slide_mpp = float(slide.mpp)
        info = {"backend": slide.backend, "slide_mpp": slide_mpp,
                "mpp_assumed": bool(getattr(slide, "mpp_assumed", False)),
                "slide_dimensions": [int(v) for v in slide.dimensions]}
    info.update(level=int(grid.level), read_size=int(grid.read_size),
                stride_level0=float(grid.stride_level0),
                tile_size_level0=int(round(settings["tile_size"] * settings["mpp"] / slide_mpp)))
    dt = settings["dtype"]
    np_dt = np.float16 if dt == "float16" else np.float32
    return {"slide_id": job["slide_id"], "features": features.astype(np_dt),
            "coords": np.asarray(grid.coords, np.int64), "views": views.astype(np_dt),
            "view_index": view_index, "info": info, "seconds": time.perf_counter() - t0,
            "worker_pid": os.getpid()}


def run_job(job: dict[str, Any], payload: dict[str, Any], settings: dict[str, Any]
             ) -> dict[str, Any]:
    """Task body: errors come back as data so one bad slide never kills the run."""
    try:
        return _embed_one(job, payload, settings)
    except Exception as err:  # noqa: BLE001 - recorded per slide
        logger.warning("slide '%s' failed: %s", job["path"], err)
        return {"slide_id": job["slide_id"], "error": f"{type(err).__name__}: {err}"}
