"""``embed_slides``: a cohort of slides -> tile embeddings (+ the Giga-SSL view bank) in a TileStore.

Parallel with dask.distributed, one task per slide. Inside a task a reader thread reads, decodes
and augments tiles ahead of the encoder (a bounded queue), so the encoder never waits for I/O.
Workers (``_embed_worker``) return arrays; the driver (this process) writes each slide atomically into the store as
it arrives, so the store has a single writer and a killed run loses at most the slides in
flight. A rerun skips slides that are complete with the same settings and redoes the rest.
The whole run holds the store's writer lock (a second run fails at once naming this one, or
queues with ``wait=``). Slide paths are made absolute here, before they travel to workers.

Coordinates are level-0 pixels ``(x, y)``; MPP in µm/px.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ssl.errors import ConfigError, InputError
from wsi_ssl.tiling._embed_worker import run_job

__all__ = ["embed_slides", "EmbedReport", "read_manifest"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedReport:
    """What one ``embed_slides`` call did.

    Attributes:
        store: path of the tile store.
        done: ids embedded and written by this call.
        skipped: ids already complete with the same settings (not redone).
        failed: ``(slide_id, path, error)`` of slides that failed (recorded in the store too).
        n_tiles: grid tiles embedded by this call; n_view_tiles: augmented view tiles embedded.
        seconds: wall-clock time of the call.
    """

    store: Path
    done: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[tuple[str, str, str], ...]
    n_tiles: int
    n_view_tiles: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def n_slides(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    @property
    def tiles_per_second(self) -> float:
        """Encoded tiles (grid + view tiles) per second of wall-clock time."""
        return (self.n_tiles + self.n_view_tiles) / self.seconds if self.seconds > 0 else 0.0


# ----------------------------------------------------------------------------------- inputs


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a manifest CSV: ``path`` (required), optional ``slide_id`` and ``mpp`` columns.
    Relative paths are relative to the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest '{path}' does not exist.")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise InputError(f"manifest '{path}' needs a 'path' column (and optionally 'slide_id', "
                         f"'mpp'); got columns {list(rows[0]) if rows else []}.")
    out = []
    for i, r in enumerate(rows, start=2):
        p = Path(r["path"].strip())
        if not p.is_absolute():
            p = path.parent / p
        mpp = (r.get("mpp") or "").strip()
        try:
            mpp_v = float(mpp) if mpp else None
        except ValueError as err:
            raise InputError(f"manifest '{path}' line {i}: mpp={mpp!r} is not a number.") from err
        if mpp_v is not None and mpp_v <= 0:
            raise InputError(f"manifest '{path}' line {i}: mpp={mpp_v} must be > 0.")
        out.append({"path": p, "slide_id": (r.get("slide_id") or "").strip() or None,
                    "mpp": mpp_v})
    return out


def _expand_items(items: list[Any]) -> list[Path]:
    """Slide files of paths/folders/globs; a plain file path that does not exist is kept (it
    becomes that slide's recorded failure) unless nothing given exists at all."""
    from wsi_ssl._utils import expand_slide_paths

    out: list[Path] = []
    missing: list[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if not p.exists() and not any(ch in str(item) for ch in "*?["):
            missing.append(p)
            out.append(p)
        else:
            out += expand_slide_paths([item])
    if missing and len(missing) == len(out):
        expand_slide_paths([missing[0]])  # raises the "matches no slide file" InputError
    return out


def _jobs(slides: Any, manifest: str | os.PathLike | None) -> list[dict[str, Any]]:
    from wsi_ssl._utils import sanitize_id

    rows: list[dict[str, Any]] = []
    if manifest is not None:
        rows += read_manifest(manifest)
    if slides is not None:
        items = [slides] if isinstance(slides, (str, os.PathLike)) else list(slides)
        plain = [s for s in items if not isinstance(s, Mapping)]
        rows += [dict(s) for s in items if isinstance(s, Mapping)]
        if plain:
            rows += [{"path": p} for p in _expand_items(plain)]
    if not rows:
        raise InputError("no slides given; pass paths, folders, globs or manifest=CSV.")
    jobs, seen = [], {}
    for r in rows:
        if "path" not in r:
            raise InputError(f"slide entry {r!r} has no 'path'.")
        # absolute before it leaves this process: workers may run in another folder
        p = Path(os.path.abspath(Path(r["path"]).expanduser()))
        sid = sanitize_id(str(r.get("slide_id") or p.stem))
        if sid in seen:
            raise InputError(f"slide id {sid!r} is used by both '{seen[sid]}' and '{p}'; give "
                             "unique slide_id values (e.g. a manifest with a slide_id column).")
        seen[sid] = p
        jobs.append({"path": str(p), "slide_id": sid, "mpp": r.get("mpp")})
    return jobs


# ----------------------------------------------------------------------------------- driver


def _settings_hash(settings: dict[str, Any], job: dict[str, Any], source: dict[str, Any]) -> str:
    blob = {k: settings.get(k) for k in _SETTINGS_KEYS}
    blob.update(job_mpp=job.get("mpp"), path=str(Path(job["path"]).resolve()), source=source)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


_SETTINGS_KEYS = ("mpp", "tile_size", "overlap", "min_tissue", "views", "view_tiles",
                  "augment_cfg", "seed", "dtype", "fingerprint", "backend")


def _repair_jobs(store: Any, jobs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """Add the slides that ``store.verify()`` finds damaged to ``jobs``; return them forced."""
    report = store.verify()
    for sid, why in report.unreadable.items():
        logger.warning("repair: slide '%s' has unreadable metadata (%s); restore its zarr.json or "
                       "delete the folder and embed the slide again.", sid, why)
    forced: set[str] = set()
    by_id = {j["slide_id"]: j for j in jobs}
    for sid, why in report.damaged.items():
        attrs = store.slide_attrs(sid) or {}
        if attrs.get("imported") or not attrs.get("source"):
            logger.warning("repair: slide '%s' is damaged (%s) but was imported, not embedded; "
                           "re-import it with import_h5(..., overwrite=True).", sid, why)
            continue
        logger.info("repair: re-embedding slide '%s' (%s)", sid, why)
        by_id[sid] = {"path": str(attrs["source"]), "slide_id": sid,
                      "mpp": attrs.get("manifest_mpp")}
        forced.add(sid)
    return list(by_id.values()), forced


def _check_repair_settings(sid: str, attrs: dict[str, Any], new_hash: str, store: Any) -> None:
    if attrs.get("settings_hash") == new_hash:
        return
    from wsi_ssl.store._integrity import repair_command

    raise ConfigError(
        f"--repair: slide '{sid}' of '{store.path}' was embedded with other settings (or from a "
        "slide file that has changed since), so re-embedding it with this command would not "
        f"restore it; rerun with the settings it was made with: {repair_command(store.path, attrs)}")


def _watch_workers(client: Any, address: str, stop: threading.Event, every: float) -> None:
    """Warn once per ``every`` seconds while no worker is connected to the scheduler."""
    since: float | None = None
    warned: float | None = None
    while not stop.wait(min(5.0, every / 4)):
        try:
            n = len(client.scheduler_info().get("workers", {}))
        except Exception:  # noqa: BLE001 - a scheduler hiccup is not our business here
            continue
        now = time.monotonic()
        if n:
            since = warned = None
            continue
        since = now if since is None else since
        if now - since >= every and (warned is None or now - warned >= every):
            warned = now
            logger.warning("no dask workers have been connected to the scheduler %s for %.0f s; "
                           "slides wait until one connects (start them with `dask worker %s`).",
                           address, now - since, address)


def _default_workers(n_jobs: int) -> tuple[int, int]:
    """(worker processes, torch threads per worker) for a LocalCluster sized to the machine."""
    import torch

    cores = os.cpu_count() or 1
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return max(1, min(n, n_jobs)), max(1, cores // max(1, n) - 2)
    # CPU: torch parallelises a batch well over ~4 cores; more processes beyond that
    n = max(1, min(n_jobs, cores // 4))
    return n, max(1, cores // n)


def _make_client(client: Any, n_workers: int | None, n_jobs: int):
    """(client, cluster_to_close, torch_threads) for ``client=None | address | Client``."""
    from distributed import Client, LocalCluster

    if client is None:
        n, threads = _default_workers(n_jobs)
        if n_workers is not None:
            n = int(n_workers)
            threads = max(1, (os.cpu_count() or 1) // n)
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster, threads
    if isinstance(client, str):
        try:
            return Client(client, timeout="30s"), None, None
        except (OSError, ValueError, TimeoutError) as err:
            raise ConfigError(f"cannot connect to the dask scheduler at client={client!r}: {err}; "
                              "start it with `dask scheduler` or pass client=None.") from err
    if hasattr(client, "submit"):
        return client, None, None
    raise ConfigError(f"client={client!r} must be None (local cluster), 'sync' (in this process), "
                      "a scheduler address 'tcp://host:port' or a distributed.Client.")


def embed_slides(
    slides: Any,
    encoder: Any,
    store: Any,
    *,
    weights: str | os.PathLike | None = None,
    mpp: float = 0.5,
    tile_size: int = 224,
    views: int = 0,
    view_tiles: int = 256,
    augment: Any = "histo",
    batch_size: int = 64,
    min_tissue: float = 0.25,
    overlap: int = 0,
    seed: int = 0,
    assume_mpp: float | None = None,
    manifest: str | os.PathLike | None = None,
    dtype: str = "float16",
    device: str = "auto",
    client: Any = None,
    n_workers: int | None = None,
    read_threads: int | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    wait: bool | float = False,
    repair: bool = False,
) -> EmbedReport:
    """Embed every tissue tile of every slide (and ``views`` augmented versions) into a store.

    Args:
        slides: files, folders, glob patterns, or dicts ``{"path", "slide_id"?, "mpp"?}``
            (``None`` with ``manifest=``).
        encoder: a :class:`~wsi_ssl.encoders.TileEncoder` or a name for
            :func:`~wsi_ssl.encoders.create_encoder` (each worker builds it once, on its device).
        store: a :class:`~wsi_ssl.store.TileStore` or its path (created if missing).
        mpp: target resolution in µm/px; tile_size: tile edge in px at that resolution.
        views: ``V`` augmented versions per slide (Giga-SSL bank; 0 = none; paper: 50).
        view_tiles: ``T`` tiles per version (sampled with replacement when the slide has fewer).
        augment: augmentation preset or config (:func:`wsi_ssl.pretrain.augment.get_augment_config`).
        batch_size: tiles per encoder call.
        min_tissue, overlap: grid settings (:func:`wsi_ssl.tiling.tile_grid`).
        seed: seeds the view sampling, per slide together with the slide id.
        assume_mpp: µm/px for slides without MPP metadata (recorded as assumed).
        manifest: CSV with ``path`` and optional ``slide_id``, ``mpp`` columns.
        dtype: storage dtype of features/views (``"float16"`` or ``"float32"``).
        device: encoder device on each worker (``"auto"``: its GPU if any).
        client: ``None`` starts a local dask cluster sized to the machine; a scheduler address
            (``"tcp://host:port"``) or a ``distributed.Client`` uses an existing cluster;
            ``"sync"`` runs in this process (debugging, benchmarks).
        n_workers: worker processes of the local cluster (``client=None`` only).
        read_threads: tile-reading threads per slide (``read_tiles(num_workers=)``).
        backend: slide reader backend (:func:`wsi_ssl.tiling.open_slide`).
        overwrite: redo slides even when complete with the same settings.
        wait: another process writing the store: ``False`` raises
            :class:`~wsi_ssl.store.StoreLockedError` naming it at once; ``True`` waits for it;
            a number waits at most that many seconds.
        repair: also re-embed every slide that :meth:`TileStore.verify` finds damaged (missing
            or altered chunks), from its recorded source, with these settings (which must be the
            ones it was made with); ``slides`` may then be None.

    Returns:
        An :class:`EmbedReport`; failed slides are recorded in ``store.failures`` too.
    """
    from wsi_ssl.encoders import TileEncoder, create_encoder
    from wsi_ssl.pretrain.augment import get_augment_config
    from wsi_ssl.store import TileStore

    t_start = time.perf_counter()
    for name, val, lo in (("mpp", mpp, 0), ("tile_size", tile_size, 8),
                          ("batch_size", batch_size, 1), ("view_tiles", view_tiles, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, float)) or val < lo or (
                name == "mpp" and val <= 0):
            raise ConfigError(f"{name}={val!r} must be a number >= {lo}" + (" (> 0)" if
                              name == "mpp" else "") + ".")
    if isinstance(views, bool) or not isinstance(views, int) or views < 0:
        raise ConfigError(f"views={views!r} must be an integer >= 0 (0 = no augmentation bank).")
    if assume_mpp is not None and assume_mpp <= 0:
        raise ConfigError(f"assume_mpp={assume_mpp!r} must be > 0 µm/px.")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"dtype={dtype!r} must be 'float16' or 'float32'.")
    aug_cfg = get_augment_config(augment)
    jobs = _jobs(slides, manifest) if (slides is not None or manifest is not None
                                       or not repair) else []
    if not isinstance(store, TileStore):
        store = TileStore(store, mode="a")
    if isinstance(encoder, TileEncoder):
        if weights is not None:
            raise ConfigError("weights= is for an encoder given by name; this TileEncoder already "
                              "has its weights.")
        enc = encoder
    elif isinstance(encoder, (str, os.PathLike)):
        enc = create_encoder(str(encoder), weights=weights, device="cpu")
    else:
        raise ConfigError(f"encoder={encoder!r} must be a TileEncoder or an encoder name.")
    with store.lock(wait=wait):
        return _run(store, enc, jobs, t_start, repair=repair, overwrite=overwrite, client=client,
                    n_workers=n_workers, device=device,
                    settings={"mpp": float(mpp), "tile_size": int(tile_size),
                              "overlap": int(overlap), "min_tissue": float(min_tissue),
                              "views": int(views), "view_tiles": int(view_tiles),
                              "augment": aug_cfg, "augment_cfg": aug_cfg.to_dict(),
                              "augment_preset": augment if isinstance(augment, str) else None,
                              "seed": int(seed), "dtype": dtype, "fingerprint": enc.fingerprint,
                              "assume_mpp": assume_mpp, "backend": backend,
                              "batch_size": int(batch_size), "read_threads": read_threads,
                              "prefetch": 4})


def _run(store: Any, enc: Any, jobs: list[dict[str, Any]], t_start: float, *, repair: bool,
         overwrite: bool, client: Any, n_workers: int | None, device: str,
         settings: dict[str, Any]) -> EmbedReport:
    """The body of :func:`embed_slides`, run while holding the store's lock."""
    from wsi_ssl._utils import file_fingerprint, progress
    from wsi_ssl._version import __version__

    store.bind_encoder(enc.name, enc.fingerprint, enc.embed_dim)  # refuses another encoder
    store.cleanup()
    forced: set[str] = set()
    if repair:
        jobs, forced = _repair_jobs(store, jobs)
    if not jobs:
        logger.info("embed_slides: nothing to do")

    assume_mpp = settings["assume_mpp"]
    todo, skipped, hashes, missing = [], [], {}, []
    for job in jobs:
        try:
            source = file_fingerprint(job["path"])
        except OSError:
            source = None
            missing.append(job)  # recorded as this slide's failure below; the others go on
        hashes[job["slide_id"]] = h = _settings_hash(settings, job, source)
        attrs = store.slide_attrs(job["slide_id"])
        if job["slide_id"] in forced and source is not None:
            _check_repair_settings(job["slide_id"], attrs or {}, h, store)
        # --assume-mpp matters only for slides that had to assume it
        assumed_ok = not (attrs and attrs.get("mpp_assumed") and job.get("mpp") is None
                          and attrs.get("slide_mpp") != assume_mpp)
        if source is None:
            continue
        if (not overwrite and job["slide_id"] not in forced and attrs
                and attrs.get("complete") is True and attrs.get("settings_hash") == h
                and assumed_ok):
            skipped.append(job["slide_id"])
        else:
            todo.append(job)
    logger.info("embed_slides: %d slides, %d already complete, %d to do", len(jobs),
                len(skipped), len(todo))

    payload: dict[str, Any] = {"fingerprint": enc.fingerprint, "device": device}
    if enc.spec is not None:
        payload["spec"] = dict(enc.spec, device=device)
    else:
        import cloudpickle  # a dask dependency; handles modules defined in __main__

        payload["pickled"] = cloudpickle.dumps(enc)
    done, failed = [], []
    n_tiles = n_view_tiles = 0
    for job in missing:
        err = (f"InputError: slide file '{job['path']}' does not exist (on {socket.gethostname()}); "
               "fix the path and rerun the same command.")
        logger.warning("slide '%s' failed: %s", job["path"], err)
        failed.append((job["slide_id"], job["path"], err))
        store.record_failure(job["slide_id"], job["path"], err)
    bar = progress(total=len(todo), desc="embed", unit="slide")

    def handle(job: dict[str, Any], res: dict[str, Any]) -> None:
        nonlocal n_tiles, n_view_tiles
        sid = job["slide_id"]
        if "error" in res:
            failed.append((sid, job["path"], res["error"]))
            store.record_failure(sid, job["path"], res["error"])
        else:
            attrs = dict(res["info"])
            attrs.update(source=str(Path(job["path"]).resolve()),
                         source_file=file_fingerprint(job["path"]), mpp=settings["mpp"],
                         manifest_mpp=job.get("mpp"),
                         embed_settings={k: settings.get(k) for k in
                                         (*_SETTINGS_KEYS, "augment_preset")},
                         tile_size=settings["tile_size"], overlap=settings["overlap"],
                         tissue={"min_tissue": settings["min_tissue"]},
                         augment=settings["augment_cfg"], seed=settings["seed"],
                         views_requested=settings["views"], wsi_ssl_version=__version__,
                         settings_hash=hashes[sid], encoder_input_size=enc.input_size)
            attrs["embed_settings"].pop("fingerprint")
            store.write_slide(sid, res["features"], res["coords"], views=res["views"],
                              view_index=res["view_index"], attrs=attrs, dtype=settings["dtype"])
            done.append(sid)
            n_tiles += len(res["features"])
            n_view_tiles += int(res["view_index"].size)
        elapsed = time.perf_counter() - t_start
        rate = (n_tiles + n_view_tiles) / elapsed if elapsed > 0 else 0.0
        k = len(done) + len(failed) - len(missing)
        eta = elapsed / k * (len(todo) - k) if k else float("nan")
        bar.update(1)
        bar.set_postfix(tiles_s=f"{rate:.0f}", failed=len(failed))
        logger.info("%d/%d slides (%s%s), %.0f tiles/s, ETA %.0f s", k, len(todo), sid,
                    " FAILED" if "error" in res else "", rate, eta)

    try:
        if todo and client == "sync":
            payload["torch_threads"] = None
            for job in todo:
                handle(job, run_job(job, payload, settings))
        elif todo:
            from distributed import as_completed

            cl, cluster, threads = _make_client(client, n_workers, len(todo))
            payload["torch_threads"] = threads
            stop = threading.Event()
            if cluster is None:  # an existing scheduler: say so when it has no workers
                address = getattr(getattr(cl, "scheduler", None), "address", None) or str(client)
                every = float(os.environ.get("WSI_SSL_NO_WORKERS_WARN_S", "60"))
                threading.Thread(target=_watch_workers, args=(cl, address, stop, every),
                                 name="wsi-ssl-watch-workers", daemon=True).start()
            try:
                futs = {}
                for job in todo:
                    f = cl.submit(run_job, job, payload, settings, pure=False,
                                  key=f"embed-{job['slide_id']}-{os.urandom(4).hex()}")
                    futs[f] = job
                for f in as_completed(futs):
                    job = futs[f]
                    try:
                        res = f.result()
                    except Exception as err:  # noqa: BLE001 - a worker died (KilledWorker...)
                        res = {"slide_id": job["slide_id"],
                               "error": f"{type(err).__name__}: {err}"}
                    handle(job, res)
                    f.release()
            finally:
                stop.set()
                if cl is not client:  # we made it: a local cluster or a connection by address
                    cl.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
    return EmbedReport(store=store.path, done=tuple(done), skipped=tuple(skipped),
                       failed=tuple(failed), n_tiles=n_tiles, n_view_tiles=n_view_tiles,
                       seconds=time.perf_counter() - t_start)
