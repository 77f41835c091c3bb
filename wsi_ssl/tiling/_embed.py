"""``embed_slides``: a cohort of slides -> tile embeddings (+ the Giga-SSL view bank) in a TileStore.

The settings are an :class:`EmbedConfig`. Where the slides run is decided by
:func:`~wsi_ssl.tiling._cluster.plan_cluster` and logged: in this process when a cluster cannot
pay off (one slide, one worker, one GPU), else a local dask cluster (one worker per GPU, pinned by
``CUDA_VISIBLE_DEVICES``), or the cluster given; one task per slide. Inside a task a reader
thread reads, decodes and augments tiles ahead of the encoder (a bounded queue), so the encoder
never waits for I/O; in this process the next slide is opened and gridded while the current one
is encoded. The driver never builds the model: the store is bound to the encoder's spec
fingerprint (its spec and the weights file's bytes). Workers (``_embed_worker``) return
:class:`SlideResult` arrays; the driver writes each slide atomically into the store as it arrives
(in a writer thread, so an in-process run encodes the next slide meanwhile), so the store has a
single writer and a killed run loses at most the slides in flight. A rerun skips slides that are complete with the same settings and redoes the rest.
The whole run holds the store's writer lock (a second run fails at once naming this one, or
queues with ``wait=``). Slide paths are made absolute here, before they travel to workers.

Coordinates are level-0 pixels ``(x, y)``; MPP in µm/px.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ssl._utils import expand_slide_items, file_fingerprint, progress, sanitize_id
from wsi_ssl._version import __version__
from wsi_ssl.encoders import (
    TileEncoder,
    create_encoder,
    encoder_identity,
    has_builtin_weights,
    spec_fingerprint,
    warn_random_weights,
    weights_kind,
)
from wsi_ssl.errors import ConfigError, InputError, RepairSettingsError
from wsi_ssl.store import RepairPlan, TileStore
from wsi_ssl.tiling._cluster import plan_cluster, start_cluster, submit_options
from wsi_ssl.tiling._config import EmbedConfig, embed_config
from wsi_ssl.tiling._embed_worker import (
    EncoderPayload,
    SlideFailure,
    SlideResult,
    run_job,
    run_jobs,
)
from wsi_ssl.tiling._jobqueue import (
    BatchCluster,
    ClusterError,
    JobQueueSpec,
    check_inputs_on_cluster,
    job_name_for,
)

__all__ = ["embed_slides", "EmbedConfig", "EmbedReport", "read_manifest", "SlideResult",
           "SlideFailure"]

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
        plan: where the slides ran and why (the line logged at the start).
        workers: ``(slide_id, where)`` of each slide this call embedded or failed (host, pid,
            ``CUDA_VISIBLE_DEVICES``, device).
    """

    store: Path
    done: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[tuple[str, str, str], ...]
    n_tiles: int
    n_view_tiles: int
    seconds: float
    plan: str = ""
    workers: tuple[tuple[str, str], ...] = ()

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
    """Rows of a manifest CSV: ``path`` (required), optional ``slide_id`` and ``slide_mpp`` (the
    slide's own µm/px, overriding its metadata; the older column name ``mpp`` is read too)
    columns. Relative paths are relative to the CSV's folder."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest '{path}' does not exist.")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise InputError(f"manifest '{path}' needs a 'path' column (and optionally 'slide_id', "
                         f"'slide_mpp'); got columns {list(rows[0]) if rows else []}.")
    out = []
    for i, r in enumerate(rows, start=2):
        p = Path(r["path"].strip())
        if not p.is_absolute():
            p = path.parent / p
        col = "slide_mpp" if "slide_mpp" in r else "mpp"
        text = (r.get(col) or "").strip()
        try:
            value = float(text) if text else None
        except ValueError as err:
            raise InputError(f"manifest '{path}' line {i}: {col}={text!r} is not a number."
                             ) from err
        if value is not None and value <= 0:
            raise InputError(f"manifest '{path}' line {i}: {col}={value} must be > 0.")
        out.append({"path": p, "slide_id": (r.get("slide_id") or "").strip() or None,
                    "slide_mpp": value})
    return out


def _slide_mpp(row: Mapping[str, Any]) -> float | None:
    """The slide's own µm/px of a slide entry (``slide_mpp``, or the older key ``mpp``)."""
    return row.get("slide_mpp", row.get("mpp"))


def _jobs(slides: Any, manifest: str | os.PathLike | None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if manifest is not None:
        rows += read_manifest(manifest)
    if slides is not None:
        items = [slides] if isinstance(slides, (str, os.PathLike)) else list(slides)
        plain = [s for s in items if not isinstance(s, Mapping)]
        rows += [dict(s) for s in items if isinstance(s, Mapping)]
        if plain:
            rows += [{"path": p} for p in expand_slide_items(plain)]
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
        jobs.append({"path": str(p), "slide_id": sid, "slide_mpp": _slide_mpp(r)})
    return jobs


# ----------------------------------------------------------------------------------- driver


def _settings_hash(config: EmbedConfig, fingerprint: str, job: dict[str, Any],
                   source: dict[str, Any] | None) -> str:
    blob = config.hash_fields(fingerprint)
    blob.update(job_mpp=job.get("slide_mpp"), path=str(Path(job["path"]).resolve()), source=source)
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _repair_jobs(store: Any, jobs: list[dict[str, Any]], report: Any
                 ) -> tuple[list[dict[str, Any]], set[str]]:
    """Add the slides that ``report`` (``store.verify()``) finds damaged to ``jobs``; return
    them forced."""
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
                      "slide_mpp": attrs.get("manifest_mpp")}
        forced.add(sid)
    return list(by_id.values()), forced


def _check_repair_settings(sid: str, attrs: dict[str, Any], new_hash: str, store: Any) -> None:
    if attrs.get("settings_hash") == new_hash:
        return
    plan = RepairPlan.from_attrs(store.path, [sid], attrs)
    made = ", ".join(f"{k}={v!r}" for k, v in plan.settings().items())
    raise RepairSettingsError(
        f"--repair: slide '{sid}' of '{store.path}' was embedded with other settings (or from a "
        "slide file that has changed since), so re-embedding it with these would not restore "
        "it; rerun embed_slides(..., repair=True) (`wsi-ssl embed --repair`) with the settings "
        f"it was made with: {made}.", repair=plan)


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


def _connect(client: Any) -> Any:
    """A ``distributed.Client`` for ``client=`` an address or a Client (an existing cluster)."""
    from distributed import Client  # lazy: dask.distributed is heavy; only for a cluster run

    if isinstance(client, str):
        try:
            return Client(client, timeout="30s")
        except (OSError, ValueError, TimeoutError) as err:
            raise ConfigError(f"cannot connect to the dask scheduler at client={client!r}: {err}; "
                              "start it with `dask scheduler` or pass client=None.") from err
    if hasattr(client, "submit"):
        return client
    raise ConfigError(f"client={client!r} must be None (decide here), 'sync' (in this process), "
                      "a scheduler address 'tcp://host:port' or a distributed.Client.")


@dataclass(frozen=True)
class _EncoderPlan:
    """How the encoder reaches the workers: ``(name, fingerprint, embed_dim, input_size)``,
    the payload, the model fingerprint (built on demand), the encoder when given built, and
    where its weights come from (:func:`~wsi_ssl.encoders.weights_kind`)."""

    ident: tuple[str, str, int, int]
    payload: EncoderPayload
    model_fingerprint: Callable[[], str]
    encoder: TileEncoder | None
    weights: str


def _by_spec(name: str, spec: dict[str, Any], fingerprint: str, embed_dim: int,
             input_size: int, config: EmbedConfig) -> tuple[tuple[str, str, int, int],
                                                           EncoderPayload]:
    ident = (name, fingerprint, embed_dim, input_size)
    payload = EncoderPayload(fingerprint=fingerprint, spec=dict(spec, device=config.device),
                             device=config.device)
    return ident, payload


def _given_encoder(enc: TileEncoder, weights: Any, config: EmbedConfig) -> _EncoderPlan:
    """The plan of an encoder given built: it travels by spec, else pickled."""
    if weights is not None:
        raise ConfigError("weights= is for an encoder given by name; this TileEncoder already "
                          "has its weights.")
    if enc.spec is not None:
        ident, payload = _by_spec(enc.name, enc.spec, spec_fingerprint(enc.spec), enc.embed_dim,
                                  enc.input_size, config)
    else:
        import cloudpickle  # lazy: a dask dependency; handles modules defined in __main__

        ident = (enc.name, enc.fingerprint, enc.embed_dim, enc.input_size)
        payload = EncoderPayload(fingerprint=enc.fingerprint, kind="model",
                                 pickled=cloudpickle.dumps(enc), device=config.device)
    return _EncoderPlan(ident, payload, lambda: enc.fingerprint, enc, weights_kind(enc.spec))


def _named_encoder(name: str | os.PathLike, weights: Any, random_weights: bool,
                   config: EmbedConfig) -> _EncoderPlan:
    """The plan of an encoder given by name: its identity, never the model (workers build
    it); a name without built-in weights or ``weights=`` warns once (random weights)."""
    if weights is None and not random_weights and not has_builtin_weights(name):
        warn_random_weights(str(name), stacklevel=4)
    info = encoder_identity(name, weights=weights, random_weights=random_weights)
    ident, payload = _by_spec(info.name, info.spec, info.fingerprint, info.embed_dim,
                              info.input_size, config)

    def model_fingerprint() -> str:
        return create_encoder(str(name), weights=weights, device="cpu",
                              random_weights=random_weights).fingerprint

    return _EncoderPlan(ident, payload, model_fingerprint, None, weights_kind(info.spec))


def _check_cluster_args(cluster: Any, client: Any, n_workers: int | None) -> None:
    if cluster is None:
        return
    if not isinstance(cluster, JobQueueSpec):
        raise ConfigError(f"cluster={cluster!r} must be a JobQueueSpec (e.g. "
                          "SlurmSpec(jobs=2)).")
    if client is not None or n_workers is not None:
        raise ConfigError("cluster= starts its own workers in batch jobs; leave client= and "
                          "n_workers= unset.")


def embed_slides(
    slides: Any,
    encoder: Any,
    store: Any,
    config: EmbedConfig | None = None,
    *,
    weights: str | os.PathLike | None = None,
    random_weights: bool = False,
    manifest: str | os.PathLike | None = None,
    client: Any = None,
    n_workers: int | None = None,
    cluster: Any = None,
    overwrite: bool = False,
    wait: bool | float = False,
    repair: bool = False,
    **overrides: Any,
) -> EmbedReport:
    """Embed every tissue tile of every slide (and ``views`` augmented versions) into a store.

    Args:
        slides: files, folders, glob patterns, or dicts ``{"path", "slide_id"?, "slide_mpp"?}``
            (``None`` with ``manifest=``).
        encoder: a :class:`~wsi_ssl.encoders.TileEncoder` or a name for
            :func:`~wsi_ssl.encoders.create_encoder`. Given by name it is never built here:
            each worker builds it once, on its device, and keeps it across slides; the store
            is bound to its spec fingerprint (spec + the weights file's bytes).
        store: a :class:`~wsi_ssl.store.TileStore` or its path (created if missing).
        config: the settings (an :class:`EmbedConfig`). Default: the EmbedConfig defaults,
            with ``mpp`` / ``tile_size`` from the encoder preset when not given (logged and
            recorded as ``settings_from_preset``; see :func:`~wsi_ssl.tiling.grid_settings`).
        **overrides: EmbedConfig fields (``mpp=``, ``tile_size=``, ``views=``, ``view_tiles=``,
            ``augment=``, ``batch_size=``, ``min_tissue=``, ``overlap=``, ``seed=``,
            ``assume_mpp=``, ``dtype=``, ``device=``, ``read_threads=``, ``backend=``, ...)
            applied over ``config`` with ``dataclasses.replace``; an unknown name is a
            ConfigError listing the close matches.
        weights: local weights for an encoder given by name.
        random_weights: embed with a random initialisation on purpose (a timm name without
            weights warns once otherwise; a preset then loads no weights). Recorded in the
            slide attrs as ``encoder.weights = "random"``.
        manifest: CSV with ``path`` and optional ``slide_id``, ``slide_mpp`` columns.
        client: ``None`` decides and logs it (:func:`~wsi_ssl.tiling._cluster.plan_cluster`):
            in this process for one slide, one worker or one GPU, else a local dask cluster
            (one worker per GPU pinned by ``CUDA_VISIBLE_DEVICES``); a scheduler address
            (``"tcp://host:port"``) or a ``distributed.Client`` uses an existing cluster (slide
            tasks ask for ``resources={"GPU": 1}`` when its workers advertise it:
            ``dask worker --resources GPU=1`` or ``dask cuda worker``); ``"sync"`` runs in this
            process.
        n_workers: worker processes of the local cluster (``client=None`` only).
        cluster: a :class:`~wsi_ssl.tiling.JobQueueSpec` (e.g. ``SlurmSpec(jobs=4,
            gpus_per_job=2)``): run on dask workers in batch jobs (Slurm, PBS, LSF, SGE) through
            dask-jobqueue, one worker per GPU, pinned; jobs that die are replaced, their
            in-flight slides retried elsewhere (``spec.max_retries``, then recorded as failed),
            and every job is cancelled when the call ends (a reaper process cancels them if this
            process is killed). ``client`` must then be ``None``.
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
    t_start = time.perf_counter()
    config = embed_config(encoder, config, overrides)
    if isinstance(encoder, TileEncoder):
        plan = _given_encoder(encoder, weights, config)
    elif isinstance(encoder, (str, os.PathLike)):
        plan = _named_encoder(encoder, weights, random_weights, config)
    else:
        raise ConfigError(f"encoder={encoder!r} must be a TileEncoder or an encoder name.")
    _check_cluster_args(cluster, client, n_workers)
    jobs = _jobs(slides, manifest) if (slides is not None or manifest is not None
                                       or not repair) else []
    if not isinstance(store, TileStore):
        store = TileStore(store, mode="a")
    damage = None
    if repair:  # read-only, before the lock: a long verification does not block other writers
        damage = store.verify()
    with store.lock(wait=wait):
        return _run(store, plan, jobs, t_start, repair=damage, overwrite=overwrite,
                    client=client, n_workers=n_workers, config=config, batch=cluster)


def _legacy_payload(store: Any, ident: tuple[str, str, int, int], payload: EncoderPayload,
                    model_fingerprint: Callable[[], str]) -> EncoderPayload:
    """A store made before spec fingerprints is bound to the model's fingerprint: build the
    model here once to compare; the same model keeps that fingerprint (and the slides'
    settings hashes), so nothing is re-embedded."""
    cur = store.encoder
    if (payload.kind != "spec" or not cur or cur.get("fingerprint") == payload.fingerprint
            or cur.get("name") != ident[0] or not store.slide_ids):
        return payload
    logger.info("embed_slides: store '%s' is bound to encoder %r by its model fingerprint (made "
                "before spec fingerprints); building the encoder here once to compare",
                store.path, ident[0])
    fp = model_fingerprint()
    if fp != cur.get("fingerprint"):
        return payload  # a different encoder: bind_encoder refuses it
    return EncoderPayload(fingerprint=fp, kind="model", spec=payload.spec, device=payload.device)


class _Writer:
    """Runs the driver's per-slide bookkeeping (store writes) in one background thread, in
    order, so the store keeps a single writer and the next slide is encoded (or fetched from a
    worker) meanwhile. The queue is bounded: when the disk is slower than the workers,
    ``submit`` blocks (backpressure: results wait on the workers, not in this process's memory).

    Args:
        maxsize: results waiting to be written, at most (besides the one being written).
    """

    def __init__(self, maxsize: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, maxsize))
        self._err: BaseException | None = None
        self.waited_s = 0.0  # time submit() spent blocked on a full queue
        self._thread = threading.Thread(target=self._loop, name="wsi-ssl-write", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            if self._err is None:
                try:
                    fn(*args)
                except BaseException as err:  # noqa: BLE001 - re-raised in the driver's thread
                    self._err = err
            del item, fn, args  # do not keep the last slide's arrays alive

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        if self._err is not None:
            raise self._err  # a failed write stops the run here
        t0 = time.perf_counter()
        self._q.put((fn, args))
        self.waited_s += time.perf_counter() - t0

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        if self._err is not None:
            raise self._err


class _Progress:
    """The live line of a run: slides done / failed / running, tiles/s, ETA and workers alive
    (a progress bar's postfix on a terminal, an INFO log line per slide and every 30 s)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = self.failed = self.tiles = 0
        self.running: int | None = None
        self.workers: int | None = None
        self._t0 = time.perf_counter()
        self._last_log = self._t0
        self._lock = threading.Lock()
        self.bar = progress(total=total, desc="embed", unit="slide")

    def line(self) -> str:
        elapsed = time.perf_counter() - self._t0
        k = self.done + self.failed
        rate = self.tiles / elapsed if elapsed > 0 else 0.0
        eta = f"{elapsed / k * (self.total - k):.0f} s" if k else "?"
        parts = [f"{k}/{self.total} slides", f"{self.failed} failed"]
        if self.running is not None:
            parts.append(f"{self.running} running")
        parts += [f"{rate:.0f} tiles/s", f"ETA {eta}"]
        if self.workers is not None:
            parts.append(f"{self.workers} workers alive")
        return ", ".join(parts)

    def _postfix(self) -> None:
        post = {"failed": self.failed, "tiles_s": f"{self.tiles / max(1e-9, time.perf_counter() - self._t0):.0f}"}
        if self.running is not None:
            post["running"] = self.running
        if self.workers is not None:
            post["workers"] = self.workers
        self.bar.set_postfix(post, refresh=True)

    def slide(self, sid: str, *, failed: bool, tiles: int) -> None:
        with self._lock:
            if failed:
                self.failed += 1
            else:
                self.done += 1
            self.tiles += tiles
            self.bar.update(1)
            self._postfix()
            logger.info("%s (%s%s)", self.line(), sid, " FAILED" if failed else "")

    def status(self, *, running: int | None, workers: int | None) -> None:
        """Refresh what only the cluster knows (called every second or so)."""
        with self._lock:
            self.running, self.workers = running, workers
            self._postfix()
            now = time.perf_counter()
            if now - self._last_log >= 30:
                self._last_log = now
                logger.info("%s", self.line())

    def close(self) -> None:
        self.bar.close()


def _triage(store: Any, jobs: list[dict[str, Any]], forced: set[str], config: EmbedConfig,
            fingerprint: str, overwrite: bool
            ) -> tuple[list[dict[str, Any]], list[str], dict[str, str], list[dict[str, Any]]]:
    """``(todo, skipped ids, settings hash per id, missing files)``: a slide complete with the
    same settings is skipped (unless ``overwrite`` or forced by ``--repair``)."""
    todo, skipped, hashes, missing = [], [], {}, []
    for job in jobs:
        try:
            source = file_fingerprint(job["path"])
        except OSError:
            source = None
            missing.append(job)  # recorded as this slide's failure; the others go on
        hashes[job["slide_id"]] = h = _settings_hash(config, fingerprint, job, source)
        attrs = store.slide_attrs(job["slide_id"])
        if job["slide_id"] in forced and source is not None:
            _check_repair_settings(job["slide_id"], attrs or {}, h, store)
        # --assume-mpp matters only for slides that had to assume it
        assumed_ok = not (attrs and attrs.get("mpp_assumed") and job.get("slide_mpp") is None
                          and attrs.get("slide_mpp") != config.assume_mpp)
        if source is None:
            continue
        if (not overwrite and job["slide_id"] not in forced and attrs
                and attrs.get("complete") is True and attrs.get("settings_hash") == h
                and assumed_ok):
            skipped.append(job["slide_id"])
        else:
            todo.append(job)
    return todo, skipped, hashes, missing


class _Bookkeeper:
    """The driver's record of a run: writes each slide's result (or failure) into the store
    with its attrs, counts tiles, keeps the progress line."""

    def __init__(self, store: Any, config: EmbedConfig, plan: _EncoderPlan,
                 hashes: dict[str, str], total: int) -> None:
        self.store, self.config, self.hashes = store, config, hashes
        self.weights = plan.weights
        self.input_size = plan.ident[3]
        self.settings = config.stored_settings()
        self.done: list[str] = []
        self.failed: list[tuple[str, str, str]] = []
        self.where: list[tuple[str, str]] = []
        self.n_tiles = self.n_view_tiles = 0
        self.progress = _Progress(total)

    def missing(self, job: dict[str, Any]) -> None:
        err = (f"InputError: slide file '{job['path']}' does not exist (on "
               f"{socket.gethostname()}); fix the path and rerun the same command.")
        logger.warning("slide '%s' failed: %s", job["path"], err)
        self.failed.append((job["slide_id"], job["path"], err))
        self.store.record_failure(job["slide_id"], job["path"], err)

    def attrs(self, job: dict[str, Any], res: SlideResult) -> dict[str, Any]:
        """The slide attrs: the worker's (``slide_mpp``, level, ...) and the run's settings."""
        cfg = self.config
        attrs = dict(res.info)
        attrs.update(source=str(Path(job["path"]).resolve()),
                     source_file=file_fingerprint(job["path"]), mpp=cfg.mpp,
                     manifest_mpp=job.get("slide_mpp"), embed_settings=dict(self.settings),
                     tile_size=cfg.tile_size, overlap=cfg.overlap,
                     tissue={"min_tissue": cfg.min_tissue},
                     augment=self.settings["augment_cfg"], seed=cfg.seed,
                     views_requested=cfg.views, wsi_ssl_version=__version__,
                     settings_hash=self.hashes[job["slide_id"]],
                     encoder_input_size=self.input_size, encoder_weights=self.weights)
        return attrs

    def handle(self, job: dict[str, Any], res: SlideResult | SlideFailure) -> None:
        sid = job["slide_id"]
        self.where.append((sid, res.worker))
        n = 0
        if isinstance(res, SlideFailure):
            self.failed.append((sid, job["path"], res.error))
            self.store.record_failure(sid, job["path"], res.error)
        else:
            self.store.write_slide(sid, res.features, res.coords, views=res.views,
                                   view_index=res.view_index, attrs=self.attrs(job, res),
                                   dtype=self.config.dtype)
            self.done.append(sid)
            self.n_tiles += len(res.features)
            self.n_view_tiles += int(res.view_index.size)
            n = len(res.features) + int(res.view_index.size)
        self.progress.slide(sid, failed=isinstance(res, SlideFailure), tiles=n)

    def report(self, skipped: list[str], plan: Any, t_start: float) -> EmbedReport:
        return EmbedReport(store=self.store.path, done=tuple(self.done), skipped=tuple(skipped),
                           failed=tuple(self.failed), n_tiles=self.n_tiles,
                           n_view_tiles=self.n_view_tiles,
                           seconds=time.perf_counter() - t_start,
                           plan=plan.reason if plan is not None else "",
                           workers=tuple(self.where))


def _run(store: Any, plan: _EncoderPlan, jobs: list[dict[str, Any]], t_start: float, *,
         repair: Any, overwrite: bool, client: Any, n_workers: int | None,
         config: EmbedConfig, batch: Any = None) -> EmbedReport:
    """The body of :func:`embed_slides`, run while holding the store's lock."""
    payload = _legacy_payload(store, plan.ident, plan.payload, plan.model_fingerprint)
    store.bind_encoder(plan.ident[0], payload.fingerprint, plan.ident[2],  # refuses another
                       weights=plan.weights)
    store.cleanup()
    forced: set[str] = set()
    if repair is not None:  # the store.verify() report made before the lock was taken
        jobs, forced = _repair_jobs(store, jobs, repair)
    if not jobs:
        logger.info("embed_slides: nothing to do")
    todo, skipped, hashes, missing = _triage(store, jobs, forced, config, payload.fingerprint,
                                             overwrite)
    logger.info("embed_slides: %d slides, %d already complete, %d to do", len(jobs),
                len(skipped), len(todo))
    book = _Bookkeeper(store, config, plan, hashes, total=len(todo))
    for job in missing:
        book.missing(job)
    where = (plan_cluster(len(todo), client=client, n_workers=n_workers, cluster=batch)
             if todo else None)
    if where is not None:
        logger.info("embed_slides: %s", where.reason)
    writer = _Writer()
    try:
        if where is not None and where.kind == "sync":
            for job, res in run_jobs(todo, payload, config, encoder=plan.encoder):
                writer.submit(book.handle, job, res)
        elif where is not None:
            _run_on_cluster(where, todo, payload, config, client, writer, book.handle,
                            start_cluster, submit_options, batch=batch, store=store,
                            progress=book.progress)
    finally:
        try:
            writer.close()
        finally:
            book.progress.close()
    return book.report(skipped, where, t_start)


def _run_on_cluster(plan: Any, todo: list[dict[str, Any]], payload: EncoderPayload,
                    config: EmbedConfig, client: Any, writer: _Writer,
                    handle: Callable[..., None], start_cluster: Callable[..., Any],
                    submit_options: Callable[[Any], dict[str, Any]], *, batch: Any = None,
                    store: Any = None, progress: _Progress | None = None) -> None:
    """Submit one task per slide to a local (GPU) cluster, batch jobs (``batch``) or the given
    cluster; hand each result to ``handle`` (in ``writer``'s thread) as it arrives."""
    payload = dataclasses.replace(payload, torch_threads=plan.torch_threads)
    stop = threading.Event()
    bc = None
    with contextlib.ExitStack() as stack:
        if plan.kind == "batch":
            stack.enter_context(_terminate_as_interrupt())
            bc = stack.enter_context(BatchCluster(batch, job_name=job_name_for(store.path)))
            cl = bc.client
        elif plan.kind in ("local", "local-gpu"):
            cl, cluster = start_cluster(plan)
            stack.callback(cluster.close)
            stack.callback(cl.close)
        else:
            cl = _connect(client)
            if cl is not client:  # a connection by address: ours to close
                stack.callback(cl.close)
            address = getattr(getattr(cl, "scheduler", None), "address", None) or str(client)
            every = float(os.environ.get("WSI_SSL_NO_WORKERS_WARN_S", "60"))
            threading.Thread(target=_watch_workers, args=(cl, address, stop, every),
                             name="wsi-ssl-watch-workers", daemon=True).start()
        stack.callback(stop.set)
        if bc is not None:
            _wait_first_worker(bc, progress)
            weights = (payload.spec or {}).get("weights")
            check_inputs_on_cluster(cl, [j["path"] for j in todo], str(store.path),
                                    [str(weights)] if weights else [])
        opts = submit_options(cl)
        if opts:
            logger.info("embed_slides: the cluster's workers advertise GPU resources; each "
                        "slide task holds one GPU")
        futs = {}
        for job in todo:
            f = cl.submit(run_job, job, payload, config, pure=False,
                          key=f"embed-{job['slide_id']}-{os.urandom(4).hex()}", **opts)
            futs[f] = job
        _collect(cl, futs, writer, handle, bc, progress)


def _wait_first_worker(bc: Any, progress: _Progress | None) -> None:
    """Block until a worker of the batch jobs connects (they may queue for a while)."""
    while bc.workers_alive() == 0:
        bc.raise_if_failed()
        if progress is not None:
            progress.status(running=0, workers=0)
        time.sleep(0.5)


def _collect(cl: Any, futs: dict[Any, dict[str, Any]], writer: _Writer,
             handle: Callable[..., None], bc: Any, progress: _Progress | None) -> None:
    """Hand each finished slide task's result to the writer as it arrives; meanwhile refresh
    the progress line and stop if the batch cluster failed or the scheduler is lost."""
    from distributed import as_completed  # lazy: dask.distributed is heavy; cluster runs only
    from distributed.client import FutureCancelledError  # lazy: as above

    ac = as_completed(futs)
    n_left = len(futs)
    while n_left:
        with ac.thread_condition:
            if not ac.has_ready():
                ac.thread_condition.wait(timeout=1.0)
        ready = ac.next_batch(block=False)
        if not ready:
            if bc is not None:
                bc.raise_if_failed()
            if progress is not None:
                _refresh(cl, bc, progress)
            continue
        for f in ready:
            n_left -= 1
            job = futs.pop(f)
            try:
                res = f.result()
            except (FutureCancelledError, CancelledError) as err:
                if getattr(cl, "status", "running") != "running":
                    raise ClusterError(
                        f"lost the dask scheduler ({err}); the slides written so far are in "
                        "the store: rerun the same command to resume.") from err
                res = SlideFailure(slide_id=job["slide_id"], error=f"{type(err).__name__}: {err}")
            except Exception as err:  # noqa: BLE001 - its workers died (KilledWorker...)
                res = SlideFailure(slide_id=job["slide_id"], error=_task_error(err))
            f.release()
            writer.submit(handle, job, res)
            del res


def _task_error(err: BaseException) -> str:
    if type(err).__name__ == "KilledWorker":
        return ("KilledWorker: the worker running this slide died on every try (its job was "
                f"killed or preempted, out of memory, a crash in native code): {err}")
    return f"{type(err).__name__}: {err}"


def _refresh(cl: Any, bc: Any, progress: _Progress) -> None:
    try:
        processing = cl.processing()  # tasks assigned to each worker (queued there too)
        threads = cl.nthreads()
        running = sum(min(len(v), threads.get(w, 1)) for w, v in processing.items())
        workers = len(processing)
    except Exception:  # noqa: BLE001 - the scheduler is busy or closing: keep the last values
        return
    progress.status(running=running, workers=workers)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``scancel`` of the driver's own job, walltime, ``kill``) raises
    KeyboardInterrupt in the main thread, so the cleanup that cancels the worker jobs runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    prev = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)
