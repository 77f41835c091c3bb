"""Slide-level contrastive pretraining (Giga-SSL): compact slide embeddings without labels.

Reference: Lazard, Lerousseau, Decencière, Walter, "Giga-SSL: Self-Supervised Learning for
Gigapixel Images", CVPR Workshops 2023 (arXiv:2212.03273).

A *view* of a slide is one of its pre-computed augmented versions (the store's shared-augmentation
bank ``views``) from which ``k`` tiles are sampled with replacement, their coordinates augmented
(rotation, flips, per-axis scale, translation). Two views of a slide are a positive pair, the
other slides of the batch its negatives (NT-Xent). After training, a slide's embedding is the
mean of the MIL head's output over k-tile chunks of its clean tiles, L2-normalised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
import zlib
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from wsi_ssl.errors import (
    ConfigError,
    EncoderMismatchError,
    InputError,
    NotFittedError,
    StoreFormatError,
    WeightsError,
)
from wsi_ssl.pretrain._slide_data import CoordAugment, store_slide_ids

__all__ = ["SlideSSL"]

logger = logging.getLogger(__name__)

_MODEL_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"
_FORMAT = "wsi-ssl-slide-ssl"


class SlideSSL(TransformerMixin, BaseEstimator):
    """Giga-SSL slide encoder, a scikit-learn transformer: ``fit(store)``, ``transform(store)``.

    ``__init__`` only stores its arguments (``get_params`` / ``set_params`` / ``sklearn.clone``
    work); ``fit`` validates them, trains and returns ``self``; learned state ends in ``_``.
    ``head`` is the one positional argument (``SlideSSL("abmil", ...)``); scikit-learn passes
    every argument by keyword, so ``clone`` works with it. Checkpointing and the loss-curve
    picture are done by a callback (:class:`~wsi_ssl.pretrain._slide_train.SlideCheckpoint`)
    when ``checkpoint_dir`` is set, not by ``fit`` itself.

    ``tiles_per_view``, ``batch_size``, ``epochs``, ``lr`` and ``temperature`` also accept
    ``"auto"``: ``fit`` chooses them from the store's metadata (slides, bank size) and the device
    (the rule of :func:`~wsi_ssl.pretrain.slide_ssl_preset`, ``wsi-ssl pretrain-slides --preset
    auto``), logs the choice with its reason and stores the values used as ``tiles_per_view_``,
    ``batch_size_``, ``epochs_``, ``lr_``, ``temperature_`` (``settings_reason_``). An explicit
    ``tiles_per_view`` larger than the bank's tiles per version is refused (``ConfigError``).

    Training streams from the store: setup reads slide statistics only (metadata); each step reads
    only the bank versions its views use, in ``readers`` threads ahead of the model; inference
    reads clean features (and coordinates for heads that read them), prefetched the same way.

    Defaults are the paper's (Lazard et al. 2023 and its reference configuration): k=5 tiles
    per view, embedding 512, projection 512-512-512-256, NT-Xent temperature 0.05, batch 256
    slides, Adam(W) at lr 0.03 with weight decay 5e-4, 10 warm-up epochs then cosine decay to 0,
    3000 epochs. On small cohorts (tens to hundreds of slides, CPU) use a smaller batch (it is
    clamped to the cohort anyway), fewer epochs and a smaller lr, and when the label lives in a
    small part of the tissue, more tiles per view so that a view is likely to contain some of it:
    ``SlideSSL("abmil", tiles_per_view=64, batch_size=32, epochs=300, lr=1e-3,
    temperature=0.1)`` is what ``benchmarks/bench_slide_ssl.py`` runs (k=5 loses most of a 3-15 %
    region there; the attention heads, ``abmil`` and the default ``sparseconv`` with attention
    pooling over cells, beat mean-pooling heads by ~0.1-0.2 AUC).

    Args:
        head: aggregator from :func:`wsi_ssl.mil.list_heads` (default the coordinate-aware
            ``"sparseconv"``: residual sparse 3x3 convolution over the tiles' grid cells, then
            gated-attention pooling over cells; ``head_kwargs={"pooling": "mean"}`` gives the
            paper's mean pooling), ``"abmil"``, ``"gated_abmil"``, ... or ``"resmlp-mean"``
            (residual MLP + mean).
        embed_dim: slide embedding size ``E`` (the head's output).
        proj_dims: projection head after the embedding (``E -> 512 -> 512 -> 256``).
        tiles_per_view: ``k`` tiles sampled (with replacement) per view, or ``"auto"``.
        temperature: NT-Xent temperature, or ``"auto"``.
        batch_size: slides per step (clamped to the number of slides; at least 2), or ``"auto"``.
        epochs: passes over the slides (one view pair per slide per epoch), or ``"auto"``.
        lr: peak learning rate, or ``"auto"``.
        weight_decay: decoupled weight decay on weight matrices (not biases/norms).
        warmup_epochs: linear warm-up length before the cosine decay.
        optimizer: ``"adamw"`` or ``"adam"``.
        coord_augment: coordinate augmentation of each view (``None`` = off).
        head_kwargs: extra options for the head (e.g. ``{"dropout": 0.1}``).
        standardize: standardise tile features per dimension with the cohort mean/std.
        inference_chunks: ``None`` embeds every clean tile once, in shuffled chunks of ``k``;
            an integer averages that many random k-tile chunks (with replacement) instead.
        inference_batch: chunks per forward pass at inference.
        cache_bytes: memory budget of the cache of slide coordinates kept during training
            (coordinate-reading heads only; the view chunks are never cached).
        readers: threads reading batches ahead of the model (0: read in the main thread); at
            most ``readers + 1`` batches are in memory. Results do not depend on it.
        checkpoint_dir: where the checkpoint callback writes checkpoints (every
            ``checkpoint_every`` epochs) and ``loss_curve.png``; ``None`` = no checkpoints.
        checkpoint_every: epochs between checkpoints (the last epoch is always saved).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``...
        seed: seeds initialisation, view sampling and inference chunks.

    Attributes (after ``fit``):
        net_: the trained network (standardisation + head + projector).
        history_: mean loss per epoch.
        start_epoch_: epochs restored from a checkpoint (0 for a fresh run).
        slide_ids_: slides trained on; skipped_slides_: empty slides left out;
        excluded_slides_: slides left out because their statistics say NaN/inf.
        tiles_per_view_, batch_size_, epochs_, lr_, temperature_: the settings used (``"auto"``
        resolved; ``batch_size_`` clamped to the cohort); settings_reason_: why (``""`` when
        nothing was ``"auto"``).
        read_stats_: what training read from the store
        (:class:`~wsi_ssl.pretrain._slide_data.ReadStats`).
        n_features_in_, encoder_fingerprint_, store_fingerprint_, train_views_per_s_.
    """

    def __init__(self, head: str = "sparseconv", *, embed_dim: int = 512,
                 proj_dims: Sequence[int] = (512, 512, 256),
                 tiles_per_view: int | Literal["auto"] = 5,
                 temperature: float | Literal["auto"] = 0.05,
                 batch_size: int | Literal["auto"] = 256, epochs: int | Literal["auto"] = 3000,
                 lr: float | Literal["auto"] = 0.03, weight_decay: float = 5e-4,
                 warmup_epochs: int = 10,
                 optimizer: Literal["adamw", "adam"] = "adamw",
                 coord_augment: CoordAugment | None = CoordAugment(),  # noqa: B008 (frozen)
                 head_kwargs: dict[str, Any] | None = None, standardize: bool = True,
                 inference_chunks: int | None = None, inference_batch: int = 2048,
                 cache_bytes: int = 2 * 1024**3, readers: int = 2,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 1,
                 device: str = "auto", seed: int = 0) -> None:
        self.head = head
        self.embed_dim = embed_dim
        self.proj_dims = proj_dims
        self.tiles_per_view = tiles_per_view
        self.temperature = temperature
        self.batch_size = batch_size
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.optimizer = optimizer
        self.coord_augment = coord_augment
        self.head_kwargs = head_kwargs
        self.standardize = standardize
        self.inference_chunks = inference_chunks
        self.inference_batch = inference_batch
        self.cache_bytes = cache_bytes
        self.readers = readers
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.device = device
        self.seed = seed

    # -- parameters -------------------------------------------------------------------------------
    def _json_params(self) -> dict[str, Any]:
        from wsi_ssl.pretrain._slide_train import json_params

        return json_params(self.get_params(deep=False))

    @staticmethod
    def _from_json_params(p: dict[str, Any]) -> dict[str, Any]:
        p = dict(p)
        p["proj_dims"] = tuple(p["proj_dims"])
        ca = p.get("coord_augment")
        p["coord_augment"] = CoordAugment(**{**ca, "scale": tuple(ca["scale"])}) if ca else None
        p["head_kwargs"] = p.get("head_kwargs") or None  # JSON writes None as {}
        return p

    # -- model ------------------------------------------------------------------------------------
    def _build_net(self, in_dim: int):
        import torch

        from wsi_ssl.mil import create_head
        from wsi_ssl.pretrain._heads import ProjectionHead
        from wsi_ssl.pretrain._slide_heads import SlideNet

        torch.manual_seed(int(self.seed))
        head = create_head(self.head, in_dim, n_classes=0, embed_dim=int(self.embed_dim),
                           **dict(self.head_kwargs or {}))
        proj = ProjectionHead((int(head.embed_dim), *(int(d) for d in self.proj_dims)))
        return SlideNet(head, proj, in_dim)

    def _check_fitted(self) -> None:
        if not hasattr(self, "net_"):
            raise NotFittedError("this SlideSSL is not fitted yet; call fit(store) or "
                                 "SlideSSL.load(model_dir) first.")

    # -- training ---------------------------------------------------------------------------------
    def fit(self, store: Any, y: None = None, *, slide_ids: Sequence[str] | None = None,
            resume: bool = False) -> SlideSSL:
        """Train on the slides of ``store`` (no labels).

        Args:
            store: a :class:`~wsi_ssl.store.TileStore` with the augmentation bank (``--views``).
            y: ignored (scikit-learn's signature; slide SSL uses no labels).
            slide_ids: a subset of its slides (default: all complete slides).
            resume: continue from ``checkpoint_dir``'s checkpoint (same configuration and store).

        Returns:
            self.

        Raises:
            StoreFormatError: the store has no view bank (re-run the embedding with views).
            InputError: fewer than 2 usable slides (slides whose statistics say NaN/inf are
                excluded with a warning naming them).
            ConfigError: a bad parameter, or ``tiles_per_view`` above the bank's tiles per
                version.
            CheckpointError: ``resume`` with a checkpoint from another configuration or store.
        """
        from wsi_ssl._utils import progress, resolve_device
        from wsi_ssl.pretrain._presets import resolve_settings
        from wsi_ssl.pretrain._slide_data import load_cohort
        from wsi_ssl.pretrain._slide_train import SlideTrainer, TrainProgress, validate_params

        validate_params(self)
        if resume and self.checkpoint_dir is None:
            raise ConfigError("fit(resume=True) needs checkpoint_dir= (where the interrupted "
                              "run wrote its checkpoint).")
        cohort = load_cohort(store, slide_ids)
        if len(cohort) < 2:
            raise InputError(f"slide SSL needs at least 2 slides with tiles (negatives); the "
                             f"store gives {len(cohort)}: {list(cohort.slide_ids)}.")
        device = resolve_device(self.device)
        settings = resolve_settings(self.get_params(deep=False), n_slides=len(cohort),
                                    bank_tiles=cohort.bank_tiles, device=device.type,
                                    store=cohort.store)
        logger.info("SlideSSL settings: %s", settings.describe())
        cohort.warn_small_views(settings.tiles_per_view)
        trainer = SlideTrainer(self, cohort, settings, store, device)
        ckpt = self._checkpoint_callback(store, cohort, settings)
        state = ckpt.restore(trainer, resume=resume) if ckpt else TrainProgress()
        start_epoch = state.epoch
        bar = progress(total=trainer.total_steps, initial=start_epoch * trainer.steps_per_epoch,
                       desc="slide SSL", unit="step")
        try:
            for epoch in range(start_epoch, trainer.epochs):
                trainer.run_epoch(epoch, state, bar)
                if ckpt:
                    ckpt.on_epoch_end(state, trainer)
        finally:
            trainer.close()
            bar.close()
        if ckpt:
            ckpt.on_train_end(state)
        self._set_fitted(trainer, state, start_epoch, store)
        logger.info("slide SSL: %d epochs on %d slides, final loss %.4f, %.0f views/s",
                    len(state.history), len(cohort),
                    state.history[-1] if state.history else float("nan"),
                    self.train_views_per_s_)
        return self

    def _checkpoint_callback(self, store: Any, cohort: Any, settings: Any) -> Any:
        from wsi_ssl.pretrain._slide_train import RESUME_FREE, SlideCheckpoint

        if self.checkpoint_dir is None:
            return None
        run_cfg = {k: v for k, v in self._json_params().items() if k not in RESUME_FREE}
        if settings.auto:  # what "auto" chose must match too
            run_cfg["resolved"] = settings.settings()
        return SlideCheckpoint(self.checkpoint_dir, every=int(self.checkpoint_every),
                               run_config=run_cfg, slide_ids=list(cohort.slide_ids),
                               store_fingerprint=str(getattr(store, "fingerprint", "")))

    def _set_fitted(self, trainer: Any, state: Any, start_epoch: int, store: Any) -> None:
        cohort, settings = trainer.cohort, trainer.settings
        self.net_ = trainer.net.eval()
        self.history_ = state.history
        self.start_epoch_ = start_epoch
        self.slide_ids_ = tuple(cohort.slide_ids)
        self.skipped_slides_ = tuple(cohort.skipped)
        self.excluded_slides_ = tuple(cohort.excluded)
        self._set_settings(settings.settings(), settings.reason)
        self.read_stats_ = trainer.reader.stats
        self.n_features_in_ = int(cohort.dim)
        self.encoder_fingerprint_ = str(getattr(store, "encoder_fingerprint", "") or "")
        self.store_fingerprint_ = str(getattr(store, "fingerprint", ""))
        self.train_views_per_s_ = (state.views / state.train_s if state.train_s > 0
                                   else float("nan"))

    def _set_settings(self, values: dict[str, Any], reason: str) -> None:
        self.tiles_per_view_ = int(values["tiles_per_view"])
        self.batch_size_ = int(values["batch_size"])
        self.epochs_ = int(values["epochs"])
        self.lr_ = float(values["lr"])
        self.temperature_ = float(values["temperature"])
        self.settings_reason_ = str(reason)

    # -- inference --------------------------------------------------------------------------------
    def _chunks(self, n_tiles: int, sid: str) -> np.ndarray:
        k = int(self.tiles_per_view_)
        rng = np.random.default_rng([int(self.seed), zlib.crc32(sid.encode())])
        if self.inference_chunks is not None:
            return rng.integers(0, n_tiles, size=(int(self.inference_chunks), k))
        n_chunks = -(-n_tiles // k)
        perm = rng.permutation(n_tiles)
        return perm[np.arange(n_chunks * k) % n_tiles].reshape(n_chunks, k)

    def transform(self, store: Any, slide_ids: Sequence[str] | None = None, *,
                  dtype: Literal["float16", "float32"] = "float16"):
        """Embed slides: mean of the head's output over k-tile chunks of the clean tiles,
        L2-normalised; deterministic given ``seed``.

        Args:
            store: a :class:`~wsi_ssl.store.TileStore` from the same tile encoder as ``fit``
                (views are not needed).
            slide_ids: slides to embed (default all complete slides); empty slides are skipped
                with a warning and listed in ``provenance["skipped"]``.
            dtype: storage type of the embeddings (``float16``: 1 KiB per 512-d slide).

        Returns:
            :class:`~wsi_ssl.store.SlideEmbeddings` with ``(n_slides, embed_dim)`` rows.

        Raises:
            EncoderMismatchError: the store's tile encoder differs from the training one.
            InputError: unknown slide ids, NaN features (the slide is named).
        """
        from wsi_ssl._utils import progress, resolve_device
        from wsi_ssl._version import __version__
        from wsi_ssl.pretrain._slide_data import head_reads_coords, ordered_map
        from wsi_ssl.store import SlideEmbeddings

        self._check_fitted()
        if dtype not in ("float16", "float32"):
            raise ConfigError(f"transform dtype={dtype!r}; use 'float16' or 'float32'.")
        enc = str(getattr(store, "encoder_fingerprint", "") or "")
        if self.encoder_fingerprint_ and enc != self.encoder_fingerprint_:
            raise EncoderMismatchError(
                f"tile store '{getattr(store, 'path', store)}' was embedded with encoder "
                f"{enc!r} but this SlideSSL model was trained on features of "
                f"{self.encoder_fingerprint_!r}; embed the slides with the training encoder.")
        ids = store_slide_ids(store, slide_ids)
        device = resolve_device(self.device)
        net = self.net_.to(device).eval()
        coords = head_reads_coords(net.head, self.n_features_in_)
        out_ids, rows, skipped = [], [], []
        reads = ordered_map(partial(_read_clean, store, coords=coords), ids,
                            readers=int(self.readers))
        try:
            for sid, (feats, grid) in zip(ids, progress(reads, total=len(ids),
                                                        desc="encode slides", unit="slide"),
                                          strict=True):
                if len(feats) == 0:
                    skipped.append(sid)
                    continue
                if feats.shape[1] != self.n_features_in_:
                    raise EncoderMismatchError(
                        f"slide '{sid}' has {feats.shape[1]}-d features; the model expects "
                        f"{self.n_features_in_}-d (features of its training encoder).")
                rows.append(self._embed_slide(net, sid, feats, grid, device))
                out_ids.append(sid)
        finally:
            reads.close()
        if skipped:
            warnings.warn(f"skipped {len(skipped)} slide(s) without tiles: {skipped[:10]}",
                          UserWarning, stacklevel=2)
        if not rows:
            raise InputError("no slide with tiles to embed among the selected slides.")
        prov = {"method": "wsi_ssl.pretrain.SlideSSL (Giga-SSL)", "version": __version__,
                "store_fingerprint": str(getattr(store, "fingerprint", "")),
                "encoder_fingerprint": enc, "model": self._json_params(),
                "model_fingerprint": self._weights_hash(), "skipped": skipped}
        emb = np.stack(rows).astype(dtype)
        return SlideEmbeddings(tuple(out_ids), emb, prov)

    def _embed_slide(self, net: Any, sid: str, feats: np.ndarray, grid: np.ndarray | None,
                     device: Any) -> np.ndarray:
        """Mean of the head's output over the slide's k-tile chunks, L2-normalised (float64)."""
        import torch

        if not np.isfinite(feats).all():
            raise InputError(f"slide '{sid}' has NaN/inf values in its tile features; re-embed "
                             "it (or drop it from the store) before encoding it.")
        idx = self._chunks(len(feats), sid)
        total = None
        with torch.no_grad():
            for s in range(0, len(idx), int(self.inference_batch)):
                j = idx[s:s + int(self.inference_batch)]
                x = torch.from_numpy(feats[j].astype(np.float32)).to(device)
                c = torch.from_numpy(grid[j]).to(device) if grid is not None else None
                e = net.embed(x, c).double().sum(0)
                total = e if total is None else total + e
        v = (total / len(idx)).cpu().numpy()
        return v / max(np.linalg.norm(v), 1e-12)

    def fit_transform(self, store: Any, y: None = None, *,
                      slide_ids: Sequence[str] | None = None, resume: bool = False,
                      dtype: Literal["float16", "float32"] = "float16"):
        """``fit`` on ``slide_ids`` (default all complete slides) and embed **those same
        slides**: ``fit(store, slide_ids=slide_ids).transform(store, slide_ids=slide_ids)``."""
        return self.fit(store, slide_ids=slide_ids, resume=resume).transform(
            store, slide_ids=slide_ids, dtype=dtype)

    # -- persistence ------------------------------------------------------------------------------
    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.net_.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (weights) and ``config.json`` into directory ``path``."""
        from wsi_ssl._utils import atomic_write_bytes
        from wsi_ssl._version import __version__
        from wsi_ssl.pretrain._checkpoint import save_safetensors_atomic

        self._check_fitted()
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().clone().contiguous()
                   for k, v in self.net_.state_dict().items()}
        save_safetensors_atomic(tensors, path / _MODEL_FILE, {"format": _FORMAT})
        cfg = {"format": _FORMAT, "version": __version__, "params": self._json_params(),
               "n_features_in": self.n_features_in_,
               "encoder_fingerprint": self.encoder_fingerprint_,
               "store_fingerprint": self.store_fingerprint_, "history": self.history_,
               "slide_ids": list(self.slide_ids_), "skipped_slides": list(self.skipped_slides_),
               "excluded_slides": list(self.excluded_slides_),
               "settings": {"tiles_per_view": self.tiles_per_view_,
                            "batch_size": self.batch_size_, "epochs": self.epochs_,
                            "lr": self.lr_, "temperature": self.temperature_,
                            "reason": self.settings_reason_},
               "train_views_per_s": self.train_views_per_s_}
        atomic_write_bytes(path / _CONFIG_FILE, json.dumps(cfg, indent=2).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> SlideSSL:
        """Load a model written by :meth:`save` (or ``wsi-ssl pretrain-slides --out``); files of
        older versions are migrated on the fly (:func:`_migrate_params`)."""
        from safetensors.torch import load_file

        from wsi_ssl.pretrain._presets import AUTO_PARAMS

        path = Path(path)
        cfg_path, w_path = path / _CONFIG_FILE, path / _MODEL_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise WeightsError(f"'{path}' is not a SlideSSL model directory (needs {_CONFIG_FILE} "
                               f"and {_MODEL_FILE}); train one with `wsi-ssl pretrain-slides`.")
        try:
            cfg = json.loads(cfg_path.read_text())
            if cfg.get("format") != _FORMAT:
                raise ValueError(f"format={cfg.get('format')!r}")
            tensors = load_file(str(w_path))
            params = _migrate_params(cls._from_json_params(cfg["params"]), tensors)
        except Exception as err:
            raise WeightsError(f"cannot read the SlideSSL model in '{path}': {err}") from err
        if device is not None:
            params["device"] = device
        model = cls(**params)
        net = model._build_net(int(cfg["n_features_in"]))
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"weights in '{w_path}' do not fit the configured model: "
                               f"{err}") from err
        model.net_ = net.eval()
        model.history_ = list(cfg.get("history", []))
        model.start_epoch_ = 0
        model.slide_ids_ = tuple(cfg.get("slide_ids", []))
        model.skipped_slides_ = tuple(cfg.get("skipped_slides", []))
        model.excluded_slides_ = tuple(cfg.get("excluded_slides", []))
        fitted = cfg.get("settings") or {k: params[k] for k in AUTO_PARAMS}  # older files
        if any(v == "auto" for v in fitted.values()):
            raise WeightsError(f"'{cfg_path}' has 'auto' settings but not the values fit chose; "
                               "re-save the model with this version of wsi-ssl.")
        model._set_settings(fitted, str(fitted.get("reason", "")))
        model.read_stats_ = None
        model.n_features_in_ = int(cfg["n_features_in"])
        model.encoder_fingerprint_ = str(cfg.get("encoder_fingerprint", ""))
        model.store_fingerprint_ = str(cfg.get("store_fingerprint", ""))
        model.train_views_per_s_ = float(cfg.get("train_views_per_s", float("nan")))
        return model


def _migrate_params(params: dict[str, Any], tensors: dict[str, Any]) -> dict[str, Any]:
    """Constructor parameters of a saved model, updated for changes of the defaults since it was
    written (so that it rebuilds the same network)."""
    hk = dict(params.get("head_kwargs") or {})
    if (str(params.get("head", "")).lower() == "sparseconv" and "pooling" not in hk
            and not any(".attn_" in k for k in tensors)):
        # written before sparseconv pooled with attention by default (wsi-ssl 0.1 dev)
        params = {**params, "head_kwargs": {**hk, "pooling": "mean"}}
    return params


def _read_clean(store: Any, sid: str, *, coords: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A slide's clean features ``(N, D)`` and, when the head reads them, its grid-unit
    coordinates ``(N, 2)`` float32 (never the view bank)."""
    from wsi_ssl.mil import to_grid_units

    feats = np.asarray(store.read_features(sid))
    if feats.ndim != 2:
        raise StoreFormatError(f"slide '{sid}': features must be (n_tiles, dim); got shape "
                               f"{feats.shape}.")
    grid = (to_grid_units(np.asarray(store.read_coords(sid)), store.slide_attrs(sid) or {})
            if coords else None)
    return feats, grid
