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

import csv
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError
from contextlib import contextmanager as contextlib_contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from wsi_ssl._utils import expand_slide_items
from wsi_ssl.errors import ConfigError, InputError, RepairSettingsError
from wsi_ssl.store import RepairPlan
from wsi_ssl.tiling._embed_worker import (
    EncoderPayload,
    SlideFailure,
    SlideResult,
    run_job,
    run_jobs,
)
from wsi_ssl.tiling._jobqueue import ClusterError

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
        jobs.append({"path": str(p), "slide_id": sid, "mpp": r.get("mpp")})
    return jobs


# ----------------------------------------------------------------------------------- config

# the settings that decide the stored features (hashed per slide: a rerun with the same ones
# skips complete slides); the names and values are those of the stores made before EmbedConfig
_SETTINGS_KEYS = ("mpp", "tile_size", "overlap", "min_tissue", "views", "view_tiles",
                  "augment_cfg", "seed", "dtype", "fingerprint", "backend")
_DEFAULT_MPP, _DEFAULT_TILE_SIZE = 0.5, 224


def _number(name: str, val: Any, lo: float, *, integer: bool = False, strict: bool = False
            ) -> None:
    ok = (not isinstance(val, bool) and isinstance(val, (int, float))
          and (val > lo if strict else val >= lo) and (not integer or float(val).is_integer()))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={val!r} must be {kind} {'>' if strict else '>='} {lo}.")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """The settings of :func:`embed_slides` (validated on construction).

    Attributes:
        mpp: target resolution in µm/px (> 0).
        tile_size: tile edge in px at that resolution (>= 8).
        overlap: grid overlap in px; min_tissue: min tissue fraction per tile, in [0, 1].
        views: ``V`` augmented versions per slide (Giga-SSL bank; 0 = none; paper: 50).
        view_tiles: ``T`` tiles per version (sampled with replacement when the slide has fewer).
        augment: augmentation preset name or :class:`~wsi_ssl.augment.AugmentConfig` (a dict
            of its fields is turned into one).
        seed: seeds the view sampling, per slide together with the slide id.
        dtype: storage dtype of features/views.
        assume_mpp: µm/px for slides without MPP metadata (recorded as assumed).
        backend: slide reader backend (:func:`wsi_ssl.tiling.open_slide`).
        batch_size: tiles per encoder call; read_threads: tile-reading threads per slide
            (``read_tiles(read_threads=)``);
        prefetch: tile batches read ahead of the encoder.
        device: encoder device on each worker (``"auto"``: its GPU if any).
        settings_from_preset: the encoder preset whose ``mpp`` / ``tile_size`` were used
            because none were given (``None``: given, or the 0.5 / 224 defaults).
    """

    mpp: float = _DEFAULT_MPP
    tile_size: int = _DEFAULT_TILE_SIZE
    overlap: int = 0
    min_tissue: float = 0.25
    views: int = 0
    view_tiles: int = 256
    augment: Any = "histo"
    seed: int = 0
    dtype: Literal["float16", "float32"] = "float16"
    assume_mpp: float | None = None
    backend: str = "auto"
    batch_size: int = 64
    read_threads: int | None = None
    prefetch: int = 4
    device: str = "auto"
    settings_from_preset: str | None = None

    def __post_init__(self) -> None:
        from wsi_ssl.augment import get_augment_config

        _number("mpp", self.mpp, 0, strict=True)
        for name, lo in (("tile_size", 8), ("batch_size", 1), ("view_tiles", 1), ("overlap", 0),
                         ("seed", 0), ("prefetch", 1)):
            _number(name, getattr(self, name), lo, integer=True)
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0:
            raise ConfigError(f"views={self.views!r} must be an integer >= 0 (0 = no "
                              "augmentation bank).")
        _number("min_tissue", self.min_tissue, 0)
        if self.min_tissue > 1:
            raise ConfigError(f"min_tissue={self.min_tissue!r} must be a fraction in [0, 1].")
        if self.overlap >= self.tile_size:
            raise ConfigError(f"overlap={self.overlap!r} must be smaller than "
                              f"tile_size={self.tile_size}.")
        if self.assume_mpp is not None:
            _number("assume_mpp", self.assume_mpp, 0, strict=True)
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r} must be 'float16' or 'float32'.")
        if self.read_threads is not None:
            _number("read_threads", self.read_threads, 1, integer=True)
        if not isinstance(self.device, str) or not isinstance(self.backend, str):
            raise ConfigError(f"device={self.device!r} and backend={self.backend!r} must be "
                              "strings.")
        cfg = get_augment_config(self.augment)  # raises ConfigError for an unknown preset
        for name, cast in (("mpp", float), ("tile_size", int), ("overlap", int),
                           ("min_tissue", float), ("view_tiles", int), ("seed", int),
                           ("batch_size", int), ("prefetch", int)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        if not isinstance(self.augment, str):
            object.__setattr__(self, "augment", cfg)
        object.__setattr__(self, "_augment_cfg", cfg)

    @property
    def augment_config(self) -> Any:
        """The :class:`~wsi_ssl.augment.AugmentConfig` of ``augment``."""
        return self._augment_cfg  # type: ignore[attr-defined]

    def hash_fields(self, fingerprint: str) -> dict[str, Any]:
        """The settings that decide the stored features, with the encoder's fingerprint
        (what a slide's ``settings_hash`` is computed from)."""
        d = {k: getattr(self, k) for k in _SETTINGS_KEYS if hasattr(self, k) and k != "augment"}
        d.update(augment_cfg=self.augment_config.to_dict(), fingerprint=fingerprint)
        return {k: d[k] for k in _SETTINGS_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings; the store's slide attrs hold them as ``embed_settings``
        (without the run-only ``batch_size``, ``read_threads``, ``prefetch``, ``device``)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "augment"}
        d.update(augment_cfg=self.augment_config.to_dict(),
                 augment_preset=self.augment if isinstance(self.augment, str) else None)
        return json.loads(json.dumps(d))  # plain JSON types (lists, not tuples)

    def stored_settings(self) -> dict[str, Any]:
        """``to_dict()`` less the run-only settings (``embed_settings`` of the slide attrs)."""
        d = self.to_dict()
        for k in ("batch_size", "read_threads", "prefetch", "device", "assume_mpp"):
            d.pop(k)
        return d


def _preset_defaults(encoder: Any, mpp: float | None, tile_size: int | None
                     ) -> tuple[float, int, str | None]:
    """``mpp`` / ``tile_size`` not given: the encoder preset's, else 0.5 µm/px and 224 px."""
    if mpp is not None and tile_size is not None:
        return mpp, tile_size, None
    from wsi_ssl.encoders import get_preset

    name = getattr(encoder, "name", encoder)
    preset = get_preset(str(name)) if isinstance(name, (str, os.PathLike)) else None
    if preset is None:
        return (_DEFAULT_MPP if mpp is None else mpp,
                _DEFAULT_TILE_SIZE if tile_size is None else tile_size, None)
    out_mpp = preset.mpp if mpp is None else mpp
    out_size = preset.tile_size if tile_size is None else tile_size
    logger.info("embed_slides: %s from the %r preset (the resolution it was trained at)",
                " and ".join(s for s, given in ((f"mpp={out_mpp} µm/px", mpp),
                                                (f"tile_size={out_size} px", tile_size))
                             if given is None), preset.name)
    return out_mpp, out_size, preset.name


# ----------------------------------------------------------------------------------- driver


def _settings_hash(config: EmbedConfig, fingerprint: str, job: dict[str, Any],
                   source: dict[str, Any] | None) -> str:
    blob = config.hash_fields(fingerprint)
    blob.update(job_mpp=job.get("mpp"), path=str(Path(job["path"]).resolve()), source=source)
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
                      "mpp": attrs.get("manifest_mpp")}
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
    from distributed import Client

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


_SETTING_NAMES = ("mpp", "tile_size", "overlap", "min_tissue", "views", "view_tiles", "augment",
                  "seed", "dtype", "assume_mpp", "backend", "batch_size", "read_threads",
                  "device")


def embed_slides(
    slides: Any,
    encoder: Any,
    store: Any,
    *,
    weights: str | os.PathLike | None = None,
    mpp: float | None = None,
    tile_size: int | None = None,
    views: int = 0,
    view_tiles: int = 256,
    augment: Any = "histo",
    batch_size: int = 64,
    min_tissue: float = 0.25,
    overlap: int = 0,
    seed: int = 0,
    assume_mpp: float | None = None,
    manifest: str | os.PathLike | None = None,
    dtype: Literal["float16", "float32"] = "float16",
    device: str = "auto",
    client: Any = None,
    n_workers: int | None = None,
    cluster: Any = None,
    read_threads: int | None = None,
    backend: str = "auto",
    overwrite: bool = False,
    wait: bool | float = False,
    repair: bool = False,
    config: EmbedConfig | None = None,
) -> EmbedReport:
    """Embed every tissue tile of every slide (and ``views`` augmented versions) into a store.

    Args:
        slides: files, folders, glob patterns, or dicts ``{"path", "slide_id"?, "mpp"?}``
            (``None`` with ``manifest=``).
        encoder: a :class:`~wsi_ssl.encoders.TileEncoder` or a name for
            :func:`~wsi_ssl.encoders.create_encoder`. Given by name it is never built here:
            each worker builds it once, on its device, and keeps it across slides; the store
            is bound to its spec fingerprint (spec + the weights file's bytes).
        store: a :class:`~wsi_ssl.store.TileStore` or its path (created if missing).
        mpp: target resolution in µm/px; tile_size: tile edge in px at that resolution.
            ``None``: the encoder preset's (``get_preset(name).mpp`` / ``.tile_size``, logged
            and recorded as ``settings_from_preset``), else 0.5 µm/px and 224 px.
        views: ``V`` augmented versions per slide (Giga-SSL bank; 0 = none; paper: 50).
        view_tiles: ``T`` tiles per version (sampled with replacement when the slide has fewer).
        augment: augmentation preset or config (:func:`wsi_ssl.augment.get_augment_config`).
        batch_size: tiles per encoder call.
        min_tissue, overlap: grid settings (:func:`wsi_ssl.tiling.tile_grid`).
        seed: seeds the view sampling, per slide together with the slide id.
        assume_mpp: µm/px for slides without MPP metadata (recorded as assumed).
        manifest: CSV with ``path`` and optional ``slide_id``, ``mpp`` columns.
        dtype: storage dtype of features/views (``"float16"`` or ``"float32"``).
        device: encoder device on each worker (``"auto"``: its GPU if any).
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
        read_threads: tile-reading threads per slide (``read_tiles(num_workers=)``).
        backend: slide reader backend (:func:`wsi_ssl.tiling.open_slide`).
        overwrite: redo slides even when complete with the same settings.
        wait: another process writing the store: ``False`` raises
            :class:`~wsi_ssl.store.StoreLockedError` naming it at once; ``True`` waits for it;
            a number waits at most that many seconds.
        repair: also re-embed every slide that :meth:`TileStore.verify` finds damaged (missing
            or altered chunks), from its recorded source, with these settings (which must be the
            ones it was made with); ``slides`` may then be None.
        config: all the settings above (``mpp`` ... ``device``) as one :class:`EmbedConfig`;
            the matching keywords must then be left at their defaults.

    Returns:
        An :class:`EmbedReport`; failed slides are recorded in ``store.failures`` too.
    """
    import inspect

    from wsi_ssl.encoders import TileEncoder, encoder_identity, spec_fingerprint
    from wsi_ssl.store import TileStore

    t_start = time.perf_counter()
    given = {k: v for k, v in locals().items() if k in _SETTING_NAMES}
    if config is not None:
        if not isinstance(config, EmbedConfig):
            raise ConfigError(f"config={config!r} must be an EmbedConfig.")
        defaults = inspect.signature(embed_slides).parameters
        clash = sorted(k for k, v in given.items() if v != defaults[k].default)
        if clash:
            raise ConfigError(f"pass the settings either as config=EmbedConfig(...) or as "
                              f"keywords, not both; got config= and {', '.join(clash)}.")
    else:
        mpp_v, size_v, from_preset = _preset_defaults(encoder, mpp, tile_size)
        given.update(mpp=mpp_v, tile_size=size_v)
        config = EmbedConfig(**given, settings_from_preset=from_preset)
    if isinstance(encoder, TileEncoder):
        if weights is not None:
            raise ConfigError("weights= is for an encoder given by name; this TileEncoder already "
                              "has its weights.")
        enc = encoder
        if enc.spec is not None:
            ident = (enc.name, spec_fingerprint(enc.spec), enc.embed_dim, enc.input_size)
            payload = EncoderPayload(fingerprint=ident[1], spec=dict(enc.spec,
                                                                     device=config.device),
                                     device=config.device)
        else:
            import cloudpickle  # a dask dependency; handles modules defined in __main__

            ident = (enc.name, enc.fingerprint, enc.embed_dim, enc.input_size)
            payload = EncoderPayload(fingerprint=enc.fingerprint, kind="model",
                                     pickled=cloudpickle.dumps(enc), device=config.device)

        def model_fingerprint() -> str:
            return enc.fingerprint

        given_enc: TileEncoder | None = enc
    elif isinstance(encoder, (str, os.PathLike)):
        info = encoder_identity(encoder, weights=weights)  # builds nothing big
        ident = (info.name, info.fingerprint, info.embed_dim, info.input_size)
        payload = EncoderPayload(fingerprint=info.fingerprint,
                                 spec=dict(info.spec, device=config.device), device=config.device)

        def model_fingerprint() -> str:
            from wsi_ssl.encoders import create_encoder

            return create_encoder(str(encoder), weights=weights, device="cpu").fingerprint

        given_enc = None
    else:
        raise ConfigError(f"encoder={encoder!r} must be a TileEncoder or an encoder name.")
    if cluster is not None:
        from wsi_ssl.tiling._jobqueue import JobQueueSpec

        if not isinstance(cluster, JobQueueSpec):
            raise ConfigError(f"cluster={cluster!r} must be a JobQueueSpec (e.g. "
                              "SlurmSpec(jobs=2)).")
        if client is not None or n_workers is not None:
            raise ConfigError("cluster= starts its own workers in batch jobs; leave client= and "
                              "n_workers= unset.")
    jobs = _jobs(slides, manifest) if (slides is not None or manifest is not None
                                       or not repair) else []
    if not isinstance(store, TileStore):
        store = TileStore(store, mode="a")
    damage = None
    if repair:  # read-only, before the lock: a long verification does not block other writers
        damage = store.verify()
    with store.lock(wait=wait):
        return _run(store, ident, payload, model_fingerprint, jobs, t_start, repair=damage,
                    overwrite=overwrite, client=client, n_workers=n_workers, config=config,
                    encoder=given_enc, batch=cluster)


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
        import queue

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
        from wsi_ssl._utils import progress

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


def _run(store: Any, ident: tuple[str, str, int, int], payload: EncoderPayload,
         model_fingerprint: Callable[[], str], jobs: list[dict[str, Any]], t_start: float, *,
         repair: Any, overwrite: bool, client: Any, n_workers: int | None,
         config: EmbedConfig, encoder: Any = None, batch: Any = None) -> EmbedReport:
    """The body of :func:`embed_slides`, run while holding the store's lock."""
    from wsi_ssl._utils import file_fingerprint
    from wsi_ssl._version import __version__
    from wsi_ssl.tiling._cluster import plan_cluster, start_cluster, submit_options

    name, _, embed_dim, input_size = ident
    payload = _legacy_payload(store, ident, payload, model_fingerprint)
    fingerprint = payload.fingerprint
    store.bind_encoder(name, fingerprint, embed_dim)  # refuses another encoder
    store.cleanup()
    forced: set[str] = set()
    if repair is not None:  # the store.verify() report made before the lock was taken
        jobs, forced = _repair_jobs(store, jobs, repair)
    if not jobs:
        logger.info("embed_slides: nothing to do")

    assume_mpp = config.assume_mpp
    todo, skipped, hashes, missing = [], [], {}, []
    for job in jobs:
        try:
            source = file_fingerprint(job["path"])
        except OSError:
            source = None
            missing.append(job)  # recorded as this slide's failure below; the others go on
        hashes[job["slide_id"]] = h = _settings_hash(config, fingerprint, job, source)
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

    done: list[str] = []
    failed: list[tuple[str, str, str]] = []
    where: list[tuple[str, str]] = []
    n_tiles = n_view_tiles = 0
    for job in missing:
        err = (f"InputError: slide file '{job['path']}' does not exist (on {socket.gethostname()}); "
               "fix the path and rerun the same command.")
        logger.warning("slide '%s' failed: %s", job["path"], err)
        failed.append((job["slide_id"], job["path"], err))
        store.record_failure(job["slide_id"], job["path"], err)
    prog = _Progress(len(todo))
    stored_settings = config.stored_settings()

    def handle(job: dict[str, Any], res: SlideResult | SlideFailure) -> None:
        nonlocal n_tiles, n_view_tiles
        sid = job["slide_id"]
        where.append((sid, res.worker))
        if isinstance(res, SlideFailure):
            failed.append((sid, job["path"], res.error))
            store.record_failure(sid, job["path"], res.error)
        else:
            attrs = dict(res.info)
            attrs.update(source=str(Path(job["path"]).resolve()),
                         source_file=file_fingerprint(job["path"]), mpp=config.mpp,
                         manifest_mpp=job.get("mpp"), embed_settings=dict(stored_settings),
                         tile_size=config.tile_size, overlap=config.overlap,
                         tissue={"min_tissue": config.min_tissue},
                         augment=stored_settings["augment_cfg"], seed=config.seed,
                         views_requested=config.views, wsi_ssl_version=__version__,
                         settings_hash=hashes[sid], encoder_input_size=input_size)
            store.write_slide(sid, res.features, res.coords, views=res.views,
                              view_index=res.view_index, attrs=attrs, dtype=config.dtype)
            done.append(sid)
            n_tiles += len(res.features)
            n_view_tiles += int(res.view_index.size)
        n = 0 if isinstance(res, SlideFailure) else len(res.features) + int(res.view_index.size)
        prog.slide(sid, failed=isinstance(res, SlideFailure), tiles=n)

    plan = (plan_cluster(len(todo), client=client, n_workers=n_workers, cluster=batch)
            if todo else None)
    if plan is not None:
        logger.info("embed_slides: %s", plan.reason)
    writer = _Writer()
    try:
        if plan is not None and plan.kind == "sync":
            for job, res in run_jobs(todo, payload, config, encoder=encoder):
                writer.submit(handle, job, res)
        elif plan is not None:
            _run_on_cluster(plan, todo, payload, config, client, writer, handle,
                            start_cluster, submit_options, batch=batch, store=store,
                            progress=prog)
    finally:
        try:
            writer.close()
        finally:
            prog.close()
    return EmbedReport(store=store.path, done=tuple(done), skipped=tuple(skipped),
                       failed=tuple(failed), n_tiles=n_tiles, n_view_tiles=n_view_tiles,
                       seconds=time.perf_counter() - t_start,
                       plan=plan.reason if plan is not None else "", workers=tuple(where))


def _run_on_cluster(plan: Any, todo: list[dict[str, Any]], payload: EncoderPayload,
                    config: EmbedConfig, client: Any, writer: _Writer,
                    handle: Callable[..., None], start_cluster: Callable[..., Any],
                    submit_options: Callable[[Any], dict[str, Any]], *, batch: Any = None,
                    store: Any = None, progress: _Progress | None = None) -> None:
    """Submit one task per slide to a local (GPU) cluster, batch jobs (``batch``) or the given
    cluster; hand each result to ``handle`` (in ``writer``'s thread) as it arrives."""
    import contextlib
    import dataclasses

    payload = dataclasses.replace(payload, torch_threads=plan.torch_threads)
    stop = threading.Event()
    bc = None
    with contextlib.ExitStack() as stack:
        if plan.kind == "batch":
            from wsi_ssl.tiling._jobqueue import BatchCluster, job_name_for

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
            from wsi_ssl.tiling._jobqueue import check_inputs_on_cluster

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
    from distributed import as_completed
    from distributed.client import FutureCancelledError

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


@contextlib_contextmanager
def _terminate_as_interrupt():
    """SIGTERM (``scancel`` of the driver's own job, walltime, ``kill``) raises
    KeyboardInterrupt in the main thread, so the cleanup that cancels the worker jobs runs."""
    import signal

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
