"""``pretrain_tile_encoder``: self-supervised pretraining of a tile backbone on tiles streamed
from unlabeled slides, with per-epoch atomic checkpoints and resume.

The result is a ``.safetensors`` file holding the backbone's ``state_dict`` (the
``timm.create_model(arch, pretrained=False, num_classes=0)`` keys) with metadata
``{"format": "wsi-ssl-tile-encoder", "arch": ...}``: ``create_encoder(arch, weights=PATH)``
loads it, and so does ``wsi-ssl embed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from wsi_ssl._utils import atomic_write_bytes, expand_slide_paths, progress, resolve_device
from wsi_ssl._validation import Interval, validate_params
from wsi_ssl._version import __version__
from wsi_ssl.augment import get_augment_config, random_augment
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import CheckpointError, ConfigError, InputError
from wsi_ssl.pretrain._checkpoint import (
    clear_checkpoints,
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    save_encoder_weights,
)
from wsi_ssl.pretrain._methods import METHODS
from wsi_ssl.pretrain._optim import warmup_cosine
from wsi_ssl.pretrain._tile_data import TileSSLDataset, make_tile_loader, steps_for

__all__ = ["TileSSLConfig", "TileSSLResult", "pretrain_tile_encoder", "build_tile_ssl_method"]

logger = logging.getLogger(__name__)

#: Config fields that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = {"epochs", "num_workers", "device", "max_open_slides"}


_TILE_SSL_CONSTRAINTS: dict[str, list[Any]] = {
    "tile_size": [Interval(int, 16, None)],
    "epochs": [Interval(int, 1, None)],
    "tiles_per_epoch": [Interval(int, 2, None)],
    "batch_size": [Interval(int, 2, None)],
    "hidden_dim": [Interval(int, 1, None)],
    "tiles_per_slide": [Interval(int, 1, None)],
    "max_open_slides": [Interval(int, 1, None)],
    "num_workers": [Interval(int, 0, None), None],
    "mpp": [Interval(float, 0, None, closed="neither")],
    "lr": [Interval(float, 0, None, closed="neither")],
    "temperature": [Interval(float, 0, None, closed="neither")],
    "weight_decay": [Interval(float, 0, 1, closed="left")],
    "warmup_frac": [Interval(float, 0, 1, closed="left")],
    "min_tissue": [Interval(float, 0, 1)],
}


@dataclass(frozen=True, kw_only=True)
class TileSSLConfig:
    """Everything that defines a tile-SSL run (written next to the weights as JSON).

    ``pretrain_tile_encoder(slides, TileSSLConfig(...))`` runs it; see
    :func:`pretrain_tile_encoder` for the meaning of each field. ``augment`` takes a preset name,
    a dict or an ``AugmentConfig`` and is stored as the dict of its fields; ``num_workers=None``
    means up to 8 DataLoader workers, one core left free (resolved when the run starts).
    """

    arch: str = "resnet18"
    method: Literal["simclr", "byol"] = "simclr"
    tile_size: int = 224
    mpp: float = 0.5
    epochs: int = 10
    tiles_per_epoch: int = 10_000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    augment: str | dict[str, Any] | Any = "histo"
    hidden_dim: int = 2048
    out_dim: int | None = None
    temperature: float = 0.5
    momentum: float = 0.99
    min_tissue: float = 0.5
    assume_mpp: float | None = None
    tiles_per_slide: int = 8
    max_open_slides: int = 8
    num_workers: int | None = None
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not a tile-SSL method; use one of "
                              f"{sorted(METHODS)}.")
        object.__setattr__(self, "augment", get_augment_config(self.augment).to_dict())
        validate_params("TileSSLConfig", dataclasses.asdict(self), _TILE_SSL_CONSTRAINTS)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TileSSLResult:
    """What :func:`pretrain_tile_encoder` did.

    Attributes:
        weights: the tile-encoder ``.safetensors`` file (loads with ``create_encoder``).
        checkpoint_dir: the ``.ckpt`` folder with the resumable training state.
        config: the run's :class:`TileSSLConfig`.
        epochs_done: epochs completed in total (including those before a resume).
        resumed_from: epoch of the checkpoint this call started from (0 = fresh start).
        losses: mean training loss of every completed epoch (from the start of the run).
        tiles_per_s: tiles per second during this call's training (each tile gives 2 views).
        n_slides: number of slides given.
        device: the device trained on.
    """

    weights: Path
    checkpoint_dir: Path
    config: TileSSLConfig
    epochs_done: int
    resumed_from: int
    losses: tuple[float, ...]
    tiles_per_s: float
    n_slides: int
    device: str


def build_tile_ssl_method(cfg: TileSSLConfig) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """The SSL method (backbone + projection head, randomly initialised on purpose: the starting
    point of self-supervised training) that ``cfg`` describes, and the backbone's input mean and
    std. What :func:`pretrain_tile_encoder` trains; public for custom loops and benchmarks."""
    enc = create_encoder(cfg.arch, device="cpu", dtype="float32", random_weights=True)
    backbone = enc.model
    torch.manual_seed(cfg.seed)
    kw: dict[str, Any] = {"hidden_dim": cfg.hidden_dim}
    if cfg.out_dim is not None:
        kw["out_dim"] = cfg.out_dim
    if cfg.method == "simclr":
        kw["temperature"] = cfg.temperature
    else:
        kw["momentum"] = cfg.momentum
    method = METHODS[cfg.method](backbone, enc.embed_dim, **kw)
    return method, enc.mean, enc.std


def _compatible(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    diff = sorted(k for k in set(saved) | set(now)
                  if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
    if diff:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:4])
        raise CheckpointError(
            f"checkpoint '{where}' was written by a run with other settings ({pairs}); use the "
            "same settings, another out= path, or resume=False to start over."
        )


def pretrain_tile_encoder(
    slides: str | os.PathLike | Sequence[str | os.PathLike],
    config: TileSSLConfig | None = None,
    *,
    out: str | os.PathLike = "tile_encoder.safetensors",
    resume: bool = True,
    callback: Callable[[int, int, float], None] | None = None,
    **options: Any,
) -> TileSSLResult:
    """Pretrain a tile backbone with SimCLR or BYOL on random tissue tiles of ``slides``.

    Tiles are streamed (no extraction to disk) by DataLoader workers from random slides and
    random tissue positions of each slide's tile grid at ``mpp``; two views per tile come from
    :func:`wsi_ssl.augment.random_augment` on the training device. AdamW with linear warm-up and
    cosine decay; automatic mixed precision on CUDA (bfloat16 where supported, else float16 with
    loss scaling). After every epoch the full training state is checkpointed atomically in
    ``<out stem>.ckpt/`` and the backbone weights are (re)written to ``out``, so an interrupted
    run resumes from its last completed epoch when called again.

    Args:
        slides: slide files, folders or glob patterns.
        config: the run's :class:`TileSSLConfig` (default: ``TileSSLConfig()``), with the fields
            below.
        out: the ``.safetensors`` weights file to write.
        resume: continue from the newest checkpoint in ``<out stem>.ckpt/`` when there is one
            (``False``: delete it and start over).
        callback: called as ``callback(epoch, step, loss)`` after every step (1-based epoch).
        **options: :class:`TileSSLConfig` fields overriding ``config``'s:
            ``arch`` (a timm architecture, ``pretrained=False``, or a registered encoder name:
            ``"tiny-cnn"`` for quick CPU runs), ``method`` (``"simclr"`` or ``"byol"``),
            ``tile_size`` (px, read at ``mpp`` and trained at), ``mpp`` (µm/px), ``epochs``
            (total; a resumed run continues up to it), ``tiles_per_epoch``, ``batch_size``,
            ``lr`` (peak), ``weight_decay``, ``warmup_frac``, ``augment`` (preset name or
            ``AugmentConfig``), ``hidden_dim``, ``out_dim``, ``temperature`` (SimCLR),
            ``momentum`` (BYOL), ``min_tissue``, ``assume_mpp``, ``tiles_per_slide``,
            ``max_open_slides``, ``num_workers`` (``None``: up to 8, one core left free),
            ``device`` and ``seed`` (model init, tile sampling and augmentation: runs are
            reproducible).

    Returns:
        A :class:`TileSSLResult`.

    Raises:
        ConfigError: bad parameter values; InputError: no usable slide;
        CheckpointError: a checkpoint from a run with other settings (or unreadable).
    """
    known = {f.name for f in dataclasses.fields(TileSSLConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise ConfigError(f"unknown option(s) {bad} for pretrain_tile_encoder; known: "
                          f"{sorted(known)}.")
    validate_params("pretrain_tile_encoder", {"config": config},
                    {"config": [TileSSLConfig, None]})
    cfg = dataclasses.replace(config or TileSSLConfig(), **options)
    if cfg.num_workers is None:
        cfg = dataclasses.replace(cfg, num_workers=min(8, max(0, (os.cpu_count() or 1) - 1)))
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"out='{out}' must end in .safetensors (the tile-encoder weights file).")
    return _run(cfg, expand_slide_paths(slides), out, resume=resume, callback=callback)


@dataclass
class _TileRun:
    """The live state of one tile-SSL run (model, optimiser, schedule, scaler, random streams)."""

    cfg: TileSSLConfig
    cfg_now: dict[str, Any]
    dev: torch.device
    method: Any
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    aug_rng: np.random.Generator
    mean: Any
    std: Any
    steps: int
    ckpt_dir: Path
    start_epoch: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.steps * self.cfg.epochs

    @property
    def warmup(self) -> int:
        return int(round(self.total * self.cfg.warmup_frac))

    @property
    def amp_dtype(self) -> torch.dtype:
        if self.dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16


def _setup(cfg: TileSSLConfig, paths: list[Path], out: Path) -> _TileRun:
    """Build the method, its optimiser, the warm-up + cosine schedule and the AMP scaler."""
    dev = resolve_device(cfg.device)
    cfg_now = json.loads(json.dumps(cfg.to_dict() | {"slides": [str(p) for p in paths]}))
    method, mean, std = build_tile_ssl_method(cfg)
    method.to(dev)
    if dev.type == "cuda":
        method.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _TileRun(cfg=cfg, cfg_now=cfg_now, dev=dev, method=method, opt=opt, sched=None,
                   scaler=None, aug_rng=np.random.default_rng([cfg.seed, 1]),
                   mean=torch.tensor(mean, device=dev).view(1, 3, 1, 1),
                   std=torch.tensor(std, device=dev).view(1, 3, 1, 1),
                   steps=steps_for(cfg.tiles_per_epoch, cfg.batch_size),
                   ckpt_dir=out.with_name(out.stem + ".ckpt"))
    run.sched = warmup_cosine(opt, base_lr=cfg.lr, total_steps=run.total,
                              warmup_steps=run.warmup)
    use_amp = dev.type == "cuda"
    run.scaler = torch.amp.GradScaler("cuda", enabled=use_amp and run.amp_dtype == torch.float16)
    return run


def _restore(run: _TileRun, *, resume: bool) -> None:
    """Continue from the last checkpoint (``resume=True``) or clear the old ones."""
    last = latest_checkpoint(run.ckpt_dir) if resume else None
    if not resume:
        clear_checkpoints(run.ckpt_dir)
    if last is None:
        return
    tensors, state = load_checkpoint(last, run.method)
    _compatible(state["config"], run.cfg_now, last)
    restore_optimizer(run.opt, tensors, state["optimizer"])
    run.start_epoch, run.losses = int(state["epoch"]), list(state["losses"])
    run.sched = warmup_cosine(run.opt, base_lr=run.cfg.lr, total_steps=run.total,
                              warmup_steps=run.warmup,
                              start_step=run.start_epoch * run.steps)  # epochs may have grown
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if run.dev.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], run.dev)
    run.aug_rng.bit_generator.state = state["aug_rng"]
    logger.info("resuming tile SSL from '%s' (epoch %d of %d)", last, run.start_epoch,
                run.cfg.epochs)
    run.method.to(run.dev)


def _view(run: _TileRun, tiles: torch.Tensor, aug_cfg: Any) -> torch.Tensor:
    """One augmented, normalised view of a batch of tiles."""
    x = random_augment(tiles, run.aug_rng, aug_cfg, out_size=run.cfg.tile_size)
    x = (x - run.mean) / run.std
    if run.dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _train_epoch(run: _TileRun, loader: Any, epoch: int,
                 callback: Callable[[int, int, float], None] | None) -> tuple[float, int]:
    """One pass over the loader; returns the mean loss and the number of tiles seen."""
    cfg, dev = run.cfg, run.dev
    aug_cfg = get_augment_config(cfg.augment)
    use_amp = dev.type == "cuda"
    run.method.train()
    running, n_steps, n_tiles = 0.0, 0, 0
    bar = progress(loader, total=run.steps, desc=f"tile-ssl {epoch + 1}/{cfg.epochs}",
                   unit="step")
    for tiles in bar:
        tiles = tiles.to(dev, non_blocking=True)
        x_a, x_b = _view(run, tiles, aug_cfg), _view(run, tiles, aug_cfg)
        with torch.autocast(dev.type, dtype=run.amp_dtype, enabled=use_amp):
            loss = run.method(x_a, x_b)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"the {cfg.method} loss became {float(loss)} at epoch {epoch + 1} step "
                f"{n_steps + 1}; lower lr (now {cfg.lr}) or use a larger batch_size."
            )
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        run.method.after_step(epoch * run.steps + n_steps + 1, run.total)
        value = float(loss.detach())
        running += value
        n_steps += 1
        n_tiles += tiles.shape[0]
        bar.set_postfix(loss=f"{running / n_steps:.4f}")
        if callback is not None:
            callback(epoch + 1, n_steps, value)
    bar.close()
    return running / max(1, n_steps), n_tiles


def _save_epoch(run: _TileRun, out: Path, epoch: int) -> None:
    """The epoch's atomic checkpoint (model, optimiser, random streams) and the weights file."""
    opt_tensors, opt_meta = optimizer_tensors(run.opt)
    rng_tensors = {"rng.torch": torch.get_rng_state()}
    if run.dev.type == "cuda":
        rng_tensors["rng.cuda"] = torch.cuda.get_rng_state(run.dev)
    save_checkpoint(run.ckpt_dir, epoch, run.method, opt_tensors | rng_tensors, {
        "epoch": epoch, "losses": run.losses, "config": run.cfg_now,
        "optimizer": opt_meta, "scaler": run.scaler.state_dict(),
        "aug_rng": run.aug_rng.bit_generator.state,
    })
    _write_outputs(out, run.method.backbone, run.cfg, run.cfg_now, epoch, run.losses)


def _run(cfg: TileSSLConfig, paths: list[Path], out: Path, *, resume: bool,
         callback: Callable[[int, int, float], None] | None) -> TileSSLResult:
    run = _setup(cfg, paths, out)
    _restore(run, resume=resume)
    dataset = TileSSLDataset(paths, tile_size=cfg.tile_size, mpp=cfg.mpp,
                             batch_size=cfg.batch_size, batches_per_epoch=run.steps,
                             tiles_per_slide=cfg.tiles_per_slide, min_tissue=cfg.min_tissue,
                             assume_mpp=cfg.assume_mpp, max_open_slides=cfg.max_open_slides,
                             seed=cfg.seed)
    loader = make_tile_loader(dataset, num_workers=cfg.num_workers,
                              pin_memory=run.dev.type == "cuda")
    n_tiles, t_train = 0, 0.0
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            dataset.set_epoch(epoch)
            t0 = time.perf_counter()
            loss, seen = _train_epoch(run, loader, epoch, callback)
            t_train += time.perf_counter() - t0
            n_tiles += seen
            run.losses.append(loss)
            _save_epoch(run, out, epoch + 1)
            logger.info("tile SSL epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, loss)
    finally:
        dataset.close()
    if run.start_epoch >= cfg.epochs and not out.is_file():
        _write_outputs(out, run.method.backbone, cfg, run.cfg_now, run.start_epoch, run.losses)
    if not run.losses:
        raise InputError("tile SSL ran no epoch; check epochs= and the slides.")
    return TileSSLResult(
        weights=out, checkpoint_dir=run.ckpt_dir, config=cfg, epochs_done=len(run.losses),
        resumed_from=run.start_epoch, losses=tuple(float(v) for v in run.losses),
        tiles_per_s=n_tiles / t_train if t_train > 0 else 0.0, n_slides=len(paths),
        device=str(run.dev),
    )


def _write_outputs(out: Path, backbone: Any, cfg: TileSSLConfig, cfg_now: dict[str, Any],
                   epoch: int, losses: list[float]) -> None:
    save_encoder_weights(backbone, out, arch=cfg.arch, extra={
        "method": cfg.method, "epoch": str(epoch), "tile_size": str(cfg.tile_size),
        "mpp": str(cfg.mpp), "wsi_ssl_version": __version__,
    })
    info = {"weights": out.name, "epoch": epoch, "losses": losses, "config": cfg_now,
            "wsi_ssl_version": __version__}
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(info, indent=2).encode())
