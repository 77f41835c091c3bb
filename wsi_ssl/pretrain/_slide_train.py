"""Training machinery of slide SSL, kept out of ``SlideSSL.fit``: the trainer (network,
optimiser, schedule, one epoch of NT-Xent steps) and the checkpoint callback (resume, atomic
safetensors checkpoints, the loss-curve picture)."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_ssl.errors import CheckpointError
from wsi_ssl.pretrain._checkpoint import (
    _tensors,
    load_state,
    optimizer_tensors,
    restore_optimizer,
    save_state,
)
from wsi_ssl.pretrain._losses import NTXentLoss
from wsi_ssl.pretrain._optim import build_optimizer, warmup_cosine
from wsi_ssl.pretrain._slide_data import (
    CoordsCache,
    ViewReader,
    head_reads_coords,
    ordered_map,
    plan_step,
)

__all__ = ["plot_loss", "SlideTrainer", "SlideCheckpoint", "TrainProgress", "CHECKPOINT_NAME",
           "RESUME_FREE"]

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
        self.model, self.cohort, self.settings, self.device = model, cohort, settings, device
        self.epochs = int(settings.epochs)
        self.steps_per_epoch = len(cohort) // int(settings.batch_size)
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
        return warmup_cosine(self.opt, base_lr=float(self.settings.lr),
                             total_steps=self.total_steps,
                             warmup_steps=self.steps_per_epoch * int(self.model.warmup_epochs),
                             start_step=start_epoch * self.steps_per_epoch)

    def plans(self, epoch: int) -> Any:
        """The epoch's step plans (a generator drawing from the ``(seed, epoch)`` stream)."""
        rng = np.random.default_rng([int(self.model.seed), epoch])
        order = rng.permutation(len(self.cohort))
        bsz = int(self.settings.batch_size)
        for s in range(self.steps_per_epoch):
            yield plan_step(rng, order[s * bsz:(s + 1) * bsz], self.cohort,
                            tiles_per_view=int(self.settings.tiles_per_view),
                            coord_aug=self.coord_aug)

    def _batches(self, epoch: int) -> Any:
        """The batches from the first step of ``epoch`` to the end of training, read ahead by
        the readers across epoch boundaries (one stream, reopened only after a jump)."""
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
        bsz, nb = int(self.settings.batch_size), self.device.type == "cuda"
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib, at the end
    from matplotlib.figure import Figure  # lazy: matplotlib

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
