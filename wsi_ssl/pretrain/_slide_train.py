"""Training machinery of slide SSL, kept out of ``SlideSSL.fit``: the trainer (network,
optimiser, schedule, one epoch of NT-Xent steps), the checkpoint callback (resume, atomic
safetensors checkpoints, the loss-curve picture) and parameter validation."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.errors import CheckpointError, ConfigError

__all__ = ["validate_params", "plot_loss", "json_params", "SlideTrainer", "SlideCheckpoint", "TrainProgress",
           "CHECKPOINT_NAME"]

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.safetensors"
LOSS_CURVE_NAME = "loss_curve.png"
_FORMAT = "wsi-ssl-slide-ssl-checkpoint"
#: parameters that may differ between an interrupted run and its resumption
RESUME_FREE = frozenset({"device", "checkpoint_dir", "checkpoint_every", "cache_bytes",
                         "inference_chunks", "inference_batch", "readers"})


@dataclass
class TrainProgress:
    """Where a slide-SSL run stands (what a checkpoint stores besides tensors)."""

    epoch: int = 0
    history: list[float] = field(default_factory=list)
    views: int = 0
    train_s: float = 0.0


class SlideTrainer:
    """Network, optimiser, warm-up + cosine schedule, NT-Xent and the streaming data path of one
    slide-SSL run.

    Each epoch is planned in the main process from ``(seed, epoch)`` (:func:`plan_step`);
    ``model.readers`` threads read the planned version chunks ahead of the model, across epoch
    boundaries (:func:`ordered_map`, at most ``readers + 1`` batches in memory); on CUDA the
    batches are pinned and copied without blocking. Call :meth:`close` when done.

    Args:
        model: the :class:`~wsi_ssl.pretrain.SlideSSL` whose parameters define the run.
        cohort: the slides (:class:`~wsi_ssl.pretrain._slide_data.SlideCohort`).
        settings: the resolved settings (:class:`~wsi_ssl.pretrain._presets.ResolvedSettings`).
        store: the tile store the views are read from.
        device: the torch device.
    """

    def __init__(self, model: Any, cohort: Any, settings: Any, store: Any,
                 device: torch.device) -> None:
        from wsi_ssl.pretrain._losses import NTXentLoss
        from wsi_ssl.pretrain._optim import build_optimizer
        from wsi_ssl.pretrain._slide_data import CoordsCache, ViewReader, head_reads_coords

        self.model, self.cohort, self.settings, self.device = model, cohort, settings, device
        self.k = int(settings.tiles_per_view)
        self.bsz = int(settings.batch_size)
        self.epochs = int(settings.epochs)
        self.steps_per_epoch = len(cohort) // self.bsz
        self.total_steps = self.steps_per_epoch * self.epochs
        self.net = model._build_net(cohort.dim)
        if model.standardize:
            self.net.feat_mean.copy_(torch.from_numpy(cohort.mean))
            self.net.feat_std.copy_(torch.from_numpy(cohort.std))
        uses_coords = bool(getattr(self.net.head, "uses_coords", False))
        reads_coords = head_reads_coords(self.net.head, cohort.dim)
        self.net.to(device)
        self.opt = build_optimizer(self.net, lr=float(settings.lr),
                                   weight_decay=float(model.weight_decay),
                                   optimizer=model.optimizer)
        self.loss_fn = NTXentLoss(float(settings.temperature))
        self.coord_aug = model.coord_augment if uses_coords else None
        self.readers = int(model.readers)
        self.reader = ViewReader(
            store, cohort, CoordsCache(store, int(model.cache_bytes)) if reads_coords else None,
            pin=device.type == "cuda")
        self.sched = self.schedule(0)
        self._stream: Any = None
        self._stream_epoch = -1

    def schedule(self, start_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
        """The lr schedule positioned at the first step of ``start_epoch``."""
        from wsi_ssl.pretrain._optim import warmup_cosine

        return warmup_cosine(self.opt, base_lr=float(self.settings.lr),
                             total_steps=self.total_steps,
                             warmup_steps=self.steps_per_epoch * int(self.model.warmup_epochs),
                             start_step=start_epoch * self.steps_per_epoch)

    def plans(self, epoch: int) -> Any:
        """The epoch's step plans (a generator drawing from the ``(seed, epoch)`` stream)."""
        from wsi_ssl.pretrain._slide_data import plan_step

        rng = np.random.default_rng([int(self.model.seed), epoch])
        order = rng.permutation(len(self.cohort))
        for s in range(self.steps_per_epoch):
            yield plan_step(rng, order[s * self.bsz:(s + 1) * self.bsz], self.cohort, self.k,
                            self.coord_aug)

    def _batches(self, epoch: int) -> Any:
        """The batches from the first step of ``epoch`` to the end of training, read ahead by
        the readers across epoch boundaries (one stream, reopened only after a jump)."""
        from wsi_ssl.pretrain._slide_data import ordered_map

        if self._stream is None or self._stream_epoch != epoch:
            self.close()
            plans = (p for e in range(epoch, self.epochs) for p in self.plans(e))
            self._stream = ordered_map(self.reader.read_step, plans, readers=self.readers)
            self._stream_epoch = epoch
        return self._stream

    def close(self) -> None:
        """Stop the readers (batches read ahead are dropped)."""
        if self._stream is not None:
            self._stream.close()
        self._stream, self._stream_epoch = None, -1

    def run_epoch(self, epoch: int, progress: TrainProgress, bar: Any) -> None:
        """One pass over the slides (one view pair per slide), seeded by ``(seed, epoch)``."""
        torch.manual_seed(int(self.model.seed) * 100_003 + epoch)
        bsz, nb = self.bsz, self.device.type == "cuda"
        self.net.train()
        losses = []
        batches = self._batches(epoch)
        try:
            t0 = time.perf_counter()
            for _ in range(self.steps_per_epoch):
                x, c = next(batches)
                x = x.to(self.device, non_blocking=nb)
                c = c.to(self.device, non_blocking=nb) if c is not None else None
                z = self.net(x, c)
                loss = self.loss_fn(z[:bsz], z[bsz:])
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.sched.step()
                losses.append(float(loss.detach()))
                t1 = time.perf_counter()
                progress.train_s += t1 - t0
                t0 = t1
                progress.views += 2 * bsz
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.3f}", refresh=False)
        except BaseException:
            self.close()
            raise
        self._stream_epoch = epoch + 1
        progress.history.append(float(np.mean(losses)))
        progress.epoch = epoch + 1


class SlideCheckpoint:
    """Checkpoint callback of slide SSL: ``checkpoint.safetensors`` every ``every`` epochs (and
    after the last), resume from it, and ``loss_curve.png`` at the end of training.

    Args:
        directory: where the checkpoint and the picture go.
        every: epochs between checkpoints.
        run_config: the run's parameters that must match on resume.
        slide_ids: the slides trained on (must match on resume).
        store_fingerprint: the store's fingerprint (must match on resume).
    """

    def __init__(self, directory: str | os.PathLike, *, every: int, run_config: dict[str, Any],
                 slide_ids: list[str], store_fingerprint: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / CHECKPOINT_NAME
        self.every = int(every)
        self.run_config = run_config
        self.slides = hashlib.sha256("\n".join(slide_ids).encode()).hexdigest()[:16]
        self.store = store_fingerprint

    def restore(self, trainer: SlideTrainer, *, resume: bool) -> TrainProgress:
        """Load the checkpoint into ``trainer`` when ``resume`` (else warn before overwriting)."""
        from wsi_ssl.pretrain._checkpoint import load_state, restore_optimizer

        if not resume:
            if self.path.exists():
                logger.warning("overwriting the checkpoint at '%s' (pass resume=True to continue "
                               "it)", self.path)
            return TrainProgress()
        if not self.path.exists():
            logger.warning("no checkpoint at '%s'; starting from scratch", self.path)
            return TrainProgress()
        tensors, info = load_state(self.path, fmt=_FORMAT)
        saved = info.get("config", {})
        diff = sorted(k for k in set(self.run_config) | set(saved)
                      if self.run_config.get(k) != saved.get(k))
        if diff:
            raise CheckpointError(
                f"checkpoint '{self.path}' was written with other settings ({', '.join(diff)}: "
                f"{[saved.get(d) for d in diff]} vs {[self.run_config.get(d) for d in diff]}); "
                "use the same settings or another checkpoint_dir.")
        if info.get("slides") != self.slides or info.get("store") != self.store:
            raise CheckpointError(f"checkpoint '{self.path}' was trained on another store or "
                                  "slide set; use another checkpoint_dir.")
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            trainer.net.load_state_dict(model_sd, strict=True)
            restore_optimizer(trainer.opt, tensors, info["optim"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"checkpoint '{self.path}' does not fit this model: "
                                  f"{err}") from err
        progress = TrainProgress(epoch=int(info["epoch"]), history=list(info["history"]),
                                 views=int(info["views"]), train_s=float(info["train_s"]))
        trainer.sched = trainer.schedule(progress.epoch)
        logger.info("resuming slide SSL from epoch %d of %d", progress.epoch, trainer.epochs)
        return progress

    def on_epoch_end(self, progress: TrainProgress, trainer: SlideTrainer) -> None:
        """Save every ``every`` epochs and after the last one."""
        from wsi_ssl.pretrain._checkpoint import _tensors, optimizer_tensors, save_state

        if progress.epoch % self.every and progress.epoch != trainer.epochs:
            return
        tensors = _tensors(trainer.net, prefix="model.")
        opt_tensors, opt_meta = optimizer_tensors(trainer.opt)
        save_state(self.path, {**tensors, **opt_tensors}, {
            "epoch": progress.epoch, "history": progress.history, "config": self.run_config,
            "slides": self.slides, "store": self.store, "views": progress.views,
            "train_s": progress.train_s, "optim": opt_meta}, fmt=_FORMAT)

    def on_train_end(self, progress: TrainProgress) -> None:
        if progress.history:
            plot_loss(progress.history, self.directory / LOSS_CURVE_NAME)


def plot_loss(history: Any, path: str | os.PathLike, *,
              title: str = "slide SSL (NT-Xent)") -> Path:
    """A PNG of the per-epoch mean loss.

    Args:
        history: a list of per-epoch losses, or a fitted model with ``history_``.
        path: the ``.png`` to write.
        title: the plot title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = list(getattr(history, "history_", history))
    path = Path(path)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(np.arange(1, len(values) + 1), values, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def validate_params(m: Any) -> None:
    """Check the parameters of a SlideSSL (ConfigError naming the bad one)."""
    from wsi_ssl.pretrain._slide_data import CoordAugment

    def pos_int(name: str, minimum: int = 1) -> None:
        v = getattr(m, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ConfigError(f"SlideSSL {name}={v!r} must be an integer >= {minimum}.")

    def is_auto(name: str) -> bool:
        v = getattr(m, name)
        if isinstance(v, str) and v != "auto":
            raise ConfigError(f"SlideSSL {name}={v!r}: the only text value is 'auto' (chosen "
                              "from the store at fit time); otherwise give a number.")
        return v == "auto"

    for name in ("embed_dim", "inference_batch", "checkpoint_every"):
        pos_int(name)
    for name in ("tiles_per_view", "epochs"):
        if not is_auto(name):
            pos_int(name)
    pos_int("warmup_epochs", 0)
    pos_int("readers", 0)
    if not is_auto("batch_size"):
        pos_int("batch_size", 2)
    if m.inference_chunks is not None:
        pos_int("inference_chunks")
    for name in ("temperature", "lr"):
        v = getattr(m, name)
        if not is_auto(name) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not v > 0):
            raise ConfigError(f"SlideSSL {name}={v!r} must be a number > 0 or 'auto'.")
    if not isinstance(m.weight_decay, (int, float)) or m.weight_decay < 0:
        raise ConfigError(f"SlideSSL weight_decay={m.weight_decay!r} must be >= 0.")
    if m.optimizer not in ("adamw", "adam"):
        raise ConfigError(f"SlideSSL optimizer={m.optimizer!r}; use 'adamw' or 'adam'.")
    dims = tuple(m.proj_dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(f"SlideSSL proj_dims={m.proj_dims!r} must be positive integers, "
                          "e.g. (512, 512, 256).")
    if m.coord_augment is not None and not isinstance(m.coord_augment, CoordAugment):
        raise ConfigError("SlideSSL coord_augment must be a CoordAugment or None; got "
                          f"{type(m.coord_augment).__name__}.")
    if m.head_kwargs is not None and not isinstance(m.head_kwargs, dict):
        raise ConfigError(f"SlideSSL head_kwargs={m.head_kwargs!r} must be a dict or None.")


def json_params(params: dict[str, Any]) -> dict[str, Any]:
    """SlideSSL parameters as JSON values (config.json, checkpoints, provenance)."""
    import json

    p = dict(params)
    p["proj_dims"] = [int(d) for d in p["proj_dims"]]
    ca = p["coord_augment"]
    p["coord_augment"] = dataclasses.asdict(ca) if ca is not None else None
    p["checkpoint_dir"] = str(p["checkpoint_dir"]) if p["checkpoint_dir"] else None
    p["head_kwargs"] = dict(p["head_kwargs"] or {})
    return json.loads(json.dumps(p))
