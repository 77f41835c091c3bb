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

import dataclasses
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
import torch
from sklearn.base import BaseEstimator, TransformerMixin

from wsi_ssl._persist import MODEL_FILE, load_estimator, save_estimator
from wsi_ssl._utils import progress, resolve_device
from wsi_ssl._validation import Interval, Options, SequenceOf, validate_params
from wsi_ssl._version import __version__
from wsi_ssl.errors import (
    ConfigError,
    EncoderMismatchError,
    InputError,
    NotFittedError,
    StoreFormatError,
    WeightsError,
)
from wsi_ssl.mil import create_head, require_attention, to_grid_units
from wsi_ssl.pretrain._heads import ProjectionHead
from wsi_ssl.pretrain._presets import SLIDE_SSL_DEFAULTS, resolve_settings
from wsi_ssl.pretrain._slide_data import (
    CoordAugment,
    SlideCohort,
    head_reads_coords,
    load_cohort,
    ordered_map,
    store_slide_ids,
)
from wsi_ssl.pretrain._slide_heads import SlideNet
from wsi_ssl.pretrain._slide_train import (
    RESUME_FREE,
    SlideCheckpoint,
    SlideTrainer,
    TrainProgress,
)
from wsi_ssl.store import SlideEmbeddings

__all__ = ["SlideSSL"]

logger = logging.getLogger(__name__)

_FORMAT = "wsi-ssl-slide-ssl"
_D = SLIDE_SSL_DEFAULTS
_AUTO = Options({"auto"})


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

    Defaults (:data:`~wsi_ssl.pretrain.SLIDE_SSL_DEFAULTS`, their one copy, shared with
    ``wsi-ssl pretrain-slides``) are the paper's (Lazard et al. 2023 and its reference
    configuration): k=5 tiles per view, embedding 512, projection 512-512-512-256, NT-Xent
    temperature 0.05, batch 256 slides, Adam(W) at lr 0.03 with weight decay 5e-4, 10 warm-up
    epochs then cosine decay to 0, 3000 epochs. On small cohorts (tens to hundreds of slides, CPU) use a smaller batch (it is
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

    def __init__(self, head: str = _D["head"], *, embed_dim: int = _D["embed_dim"],
                 proj_dims: Sequence[int] = _D["proj_dims"],
                 tiles_per_view: int | Literal["auto"] = _D["tiles_per_view"],
                 temperature: float | Literal["auto"] = _D["temperature"],
                 batch_size: int | Literal["auto"] = _D["batch_size"],
                 epochs: int | Literal["auto"] = _D["epochs"],
                 lr: float | Literal["auto"] = _D["lr"],
                 weight_decay: float = _D["weight_decay"],
                 warmup_epochs: int = _D["warmup_epochs"],
                 optimizer: Literal["adamw", "adam"] = _D["optimizer"],
                 coord_augment: CoordAugment | None = CoordAugment(),  # noqa: B008 (frozen)
                 head_kwargs: dict[str, Any] | None = _D["head_kwargs"],
                 standardize: bool = _D["standardize"],
                 inference_chunks: int | None = _D["inference_chunks"],
                 inference_batch: int = _D["inference_batch"],
                 cache_bytes: int = _D["cache_bytes"], readers: int = _D["readers"],
                 checkpoint_dir: str | os.PathLike | None = _D["checkpoint_dir"],
                 checkpoint_every: int = _D["checkpoint_every"],
                 device: str = _D["device"], seed: int = _D["seed"]) -> None:
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
    _parameter_constraints: dict[str, list[Any]] = {
        "head": [str],
        "embed_dim": [Interval(int, 1, None)],
        "proj_dims": [SequenceOf(Interval(int, 1, None))],
        "tiles_per_view": [Interval(int, 1, None), _AUTO],
        "temperature": [Interval(float, 0, None, closed="neither"), _AUTO],
        "batch_size": [Interval(int, 2, None), _AUTO],
        "epochs": [Interval(int, 1, None), _AUTO],
        "lr": [Interval(float, 0, None, closed="neither"), _AUTO],
        "weight_decay": [Interval(float, 0, None)],
        "warmup_epochs": [Interval(int, 0, None)],
        "optimizer": [Options({"adamw", "adam"})],
        "coord_augment": [CoordAugment, None],
        "head_kwargs": [dict, None],
        "standardize": [bool],
        "inference_chunks": [Interval(int, 1, None), None],
        "inference_batch": [Interval(int, 1, None)],
        "cache_bytes": [Interval(int, 0, None)],
        "readers": [Interval(int, 0, None)],
        "checkpoint_dir": [str, os.PathLike, None],
        "checkpoint_every": [Interval(int, 1, None)],
        "device": [str],
        "seed": [Interval(int, 0, None)],
    }

    def _check_params(self) -> None:
        validate_params("SlideSSL", self.get_params(deep=False), self._parameter_constraints)

    def _json_params(self) -> dict[str, Any]:
        """The parameters as JSON values (config.json, checkpoints, provenance)."""
        p = dict(self.get_params(deep=False))
        p["proj_dims"] = [int(d) for d in p["proj_dims"]]
        ca = p["coord_augment"]
        p["coord_augment"] = dataclasses.asdict(ca) if ca is not None else None
        p["checkpoint_dir"] = str(p["checkpoint_dir"]) if p["checkpoint_dir"] else None
        p["head_kwargs"] = dict(p["head_kwargs"] or {})
        return json.loads(json.dumps(p))

    @staticmethod
    def _from_json_params(p: dict[str, Any]) -> dict[str, Any]:
        p = dict(p)
        p["proj_dims"] = tuple(p["proj_dims"])
        ca = p.get("coord_augment")
        p["coord_augment"] = CoordAugment(**{**ca, "scale": tuple(ca["scale"])}) if ca else None
        p["head_kwargs"] = p.get("head_kwargs") or None  # JSON writes None as {}
        return p

    # -- model ------------------------------------------------------------------------------------
    def _build_net(self, in_dim: int) -> SlideNet:
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
        if resume and self.checkpoint_dir is None:
            raise ConfigError("fit(resume=True) needs checkpoint_dir= (where the interrupted "
                              "run wrote its checkpoint).")
        trainer = self.make_trainer(store, slide_ids)
        cohort = trainer.cohort
        ckpt = self._checkpoint_callback(store, cohort, trainer.settings)
        state = ckpt.restore(trainer, resume=resume) if ckpt else TrainProgress()
        start_epoch = state.epoch
        self._train(trainer, state, ckpt)
        self._set_fitted(trainer, state, start_epoch, store)
        logger.info("slide SSL: %d epochs on %d slides, final loss %.4f, %.0f views/s",
                    len(state.history), len(cohort),
                    state.history[-1] if state.history else float("nan"),
                    self.train_views_per_s_)
        return self

    def make_trainer(self, store: Any, slide_ids: Sequence[str] | None = None) -> SlideTrainer:
        """The run :meth:`fit` trains, set up but not started: the cohort's statistics read,
        the settings resolved (``"auto"`` decided), the network and optimiser built. Drive it
        with ``trainer.run_epoch(epoch, TrainProgress(), bar)`` and ``trainer.close()``; its
        ``reader.stats`` count what the data path read. For custom loops and benchmarks.

        Raises:
            the errors of :meth:`fit`.
        """
        self._check_params()
        cohort = self._cohort(store, slide_ids)
        device = resolve_device(self.device)
        settings = resolve_settings(self.get_params(deep=False), n_slides=len(cohort),
                                    bank_tiles=cohort.bank_tiles, device=device.type,
                                    store=cohort.store)
        logger.info("SlideSSL settings: %s", settings.describe())
        cohort.warn_small_views(settings.tiles_per_view)
        return SlideTrainer(self, cohort, settings, store, device)

    @staticmethod
    def _cohort(store: Any, slide_ids: Sequence[str] | None) -> SlideCohort:
        """The usable slides of ``store`` (at least 2: the others are a slide's negatives)."""
        cohort = load_cohort(store, slide_ids)
        if len(cohort) < 2:
            raise InputError(f"slide SSL needs at least 2 slides with tiles (negatives); the "
                             f"store gives {len(cohort)}: {list(cohort.slide_ids)}.")
        return cohort

    @staticmethod
    def _train(trainer: SlideTrainer, state: TrainProgress,
               ckpt: SlideCheckpoint | None) -> None:
        """The epochs from ``state.epoch`` to the end, with the checkpoint callback."""
        bar = progress(total=trainer.total_steps, initial=state.epoch * trainer.steps_per_epoch,
                       desc="slide SSL", unit="step")
        try:
            for epoch in range(state.epoch, trainer.epochs):
                trainer.run_epoch(epoch, state, bar)
                if ckpt:
                    ckpt.on_epoch_end(state, trainer)
        finally:
            trainer.close()
            bar.close()
        if ckpt:
            ckpt.on_train_end(state)

    def _checkpoint_callback(self, store: Any, cohort: Any, settings: Any
                             ) -> SlideCheckpoint | None:
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
                  dtype: Literal["float16", "float32"] = "float16") -> SlideEmbeddings:
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
        out_ids, rows, skipped = self._embed_slides(store, ids)
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

    def _embed_slides(self, store: Any, ids: list[str]
                      ) -> tuple[list[str], list[np.ndarray], list[str]]:
        """``(embedded ids, their rows, skipped empty ids)``; slides read ahead by the readers."""
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
        return out_ids, rows, skipped

    def _embed_slide(self, net: Any, sid: str, feats: np.ndarray, grid: np.ndarray | None,
                     device: Any) -> np.ndarray:
        """Mean of the head's output over the slide's k-tile chunks, L2-normalised (float64)."""
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
                      dtype: Literal["float16", "float32"] = "float16") -> SlideEmbeddings:
        """``fit`` on ``slide_ids`` (default all complete slides) and embed **those same
        slides**: ``fit(store, slide_ids=slide_ids).transform(store, slide_ids=slide_ids)``."""
        return self.fit(store, slide_ids=slide_ids, resume=resume).transform(
            store, slide_ids=slide_ids, dtype=dtype)

    def attention(self, bag: Any, *, coords: Any | None = None) -> np.ndarray:
        """Attention weights of the MIL head over all the tiles of one slide, taken as one bag
        (standardised like in training; no chunks, no projection).

        Args:
            bag: the slide's tile features.
            coords: the tiles' positions in grid units (level-0 px / ``stride_level0``); needed
                by coordinate-aware heads, used by heads that read them.

        Shape:
            bag ``(n, D)``, coords ``(n, 2)`` -> ``(n,)`` float32 weights summing to 1.

        Raises:
            NotFittedError: before ``fit`` / ``load``.
            ConfigError: the head pools without attention weights (the message names the heads
                that have them).
            InputError: a bag of the wrong shape, NaN/inf features, missing coords.
        """
        self._check_fitted()
        net = self.net_
        require_attention(net.head, "SlideSSL", self.head)
        x, c = _bag_tensors("SlideSSL", bag, coords, self.n_features_in_,
                            next(net.parameters()).device)
        x = (x - net.feat_mean) / net.feat_std
        with torch.no_grad():
            att = net.head(x[None], None, None if c is None else c[None]).attention
        return att[0].cpu().numpy().astype(np.float32)

    # -- persistence ------------------------------------------------------------------------------
    def _weights_hash(self) -> str:
        h = hashlib.sha256()
        for name, t in sorted(self.net_.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` (weights) and ``config.json`` (format, parameters,
        fitted state) into directory ``path`` (:func:`wsi_ssl._persist.save_estimator`)."""
        self._check_fitted()
        return save_estimator(path, format=_FORMAT, params=self._json_params(),
                              tensors=self.net_.state_dict(), state={
            "n_features_in": self.n_features_in_,
            "encoder_fingerprint": self.encoder_fingerprint_,
            "store_fingerprint": self.store_fingerprint_, "history": self.history_,
            "slide_ids": list(self.slide_ids_), "skipped_slides": list(self.skipped_slides_),
            "excluded_slides": list(self.excluded_slides_),
            "settings": {"tiles_per_view": self.tiles_per_view_,
                         "batch_size": self.batch_size_, "epochs": self.epochs_,
                         "lr": self.lr_, "temperature": self.temperature_,
                         "reason": self.settings_reason_},
            "train_views_per_s": self.train_views_per_s_})

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | None = None) -> SlideSSL:
        """Load a model written by :meth:`save` (or ``wsi-ssl pretrain-slides --out``);
        ``device`` overrides the saved one."""
        path = Path(path)
        cfg, tensors = load_estimator(path, format=_FORMAT, owner="SlideSSL model",
                                      hint="train one with `wsi-ssl pretrain-slides`")
        try:
            params = cls._from_json_params(cfg["params"])
            n_features, settings = int(cfg["n_features_in"]), dict(cfg["settings"])
        except (KeyError, TypeError, ValueError) as err:
            raise WeightsError(f"cannot read the SlideSSL model in '{path}': config.json lacks "
                               f"or garbles {err}; save the model again.") from err
        if device is not None:
            params["device"] = device
        model = cls(**params)
        net = model._build_net(n_features)
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise WeightsError(f"weights in '{path / MODEL_FILE}' do not fit the configured "
                               f"model: {err}") from err
        model._set_loaded(net, cfg, settings)
        return model

    def _set_loaded(self, net: SlideNet, cfg: dict[str, Any], settings: dict[str, Any]) -> None:
        """The fitted attributes of a loaded model."""
        self.net_ = net.eval()
        self.history_ = list(cfg.get("history", []))
        self.start_epoch_ = 0
        self.slide_ids_ = tuple(cfg.get("slide_ids", []))
        self.skipped_slides_ = tuple(cfg.get("skipped_slides", []))
        self.excluded_slides_ = tuple(cfg.get("excluded_slides", []))
        self._set_settings(settings, str(settings.get("reason", "")))
        self.read_stats_ = None
        self.n_features_in_ = int(cfg["n_features_in"])
        self.encoder_fingerprint_ = str(cfg.get("encoder_fingerprint", ""))
        self.store_fingerprint_ = str(cfg.get("store_fingerprint", ""))
        self.train_views_per_s_ = float(cfg.get("train_views_per_s", float("nan")))


def _bag_tensors(owner: str, bag: Any, coords: Any | None, n_features: int, device: Any
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One bag ``(n, D)`` and its coords ``(n, 2)`` (or None) as float32 tensors, checked."""
    x = np.asarray(bag, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != n_features or len(x) == 0:
        raise InputError(f"{owner}.attention: bag has shape {x.shape}; expected (n, "
                         f"{n_features}) tile features with n >= 1.")
    if not np.isfinite(x).all():
        raise InputError(f"{owner}.attention: the bag has NaN/inf features; clean them first.")
    c = None
    if coords is not None:
        c = np.asarray(coords, dtype=np.float32)
        if c.shape != (len(x), 2):
            raise InputError(f"{owner}.attention: coords shape {c.shape}, expected "
                             f"{(len(x), 2)}.")
        c = torch.from_numpy(c).to(device)
    return torch.from_numpy(x).to(device), c


def _read_clean(store: Any, sid: str, *, coords: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """A slide's clean features ``(N, D)`` and, when the head reads them, its grid-unit
    coordinates ``(N, 2)`` float32 (never the view bank)."""
    feats = np.asarray(store.read_features(sid))
    if feats.ndim != 2:
        raise StoreFormatError(f"slide '{sid}': features must be (n_tiles, dim); got shape "
                               f"{feats.shape}.")
    grid = (to_grid_units(np.asarray(store.read_coords(sid)), store.slide_attrs(sid) or {})
            if coords else None)
    return feats, grid
