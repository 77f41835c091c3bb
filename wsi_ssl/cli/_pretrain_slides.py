"""``wsi-ssl pretrain-slides``: Giga-SSL slide-level contrastive pretraining on a tile store."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wsi_ssl.pretrain import (  # light: these come from the presets module, without torch
    AUTO_PARAMS,
    DEFAULT_PRESET,
    PAPER_SETTINGS,
    SLIDE_SSL_DEFAULTS,
    SLIDE_SSL_PRESETS,
)

HELP = "train a slide encoder (Giga-SSL) on a tile store with a view bank; no labels"
DESCRIPTION = (
    "Slide-level contrastive pretraining (Giga-SSL, Lazard et al. CVPRW 2023) on a zarr tile "
    "store embedded with --views. Checkpoints every epoch into MODEL_DIR; --resume continues an "
    "interrupted run. Writes MODEL_DIR/model.safetensors, config.json and loss_curve.png. "
    "--preset auto (default) lets SlideSSL choose tiles per view, batch, epochs, lr and "
    "temperature inside fit from the store's metadata (slides, bank size) and the device, and "
    "prints the choice and why before training; --preset paper is Giga-SSL exactly (k=5, batch "
    "256, 3000 epochs, lr 0.03, T 0.05); explicit flags override a preset."
)


#: SlideSSL parameters given as flags (``--embed-dim`` -> ``embed_dim``): type and help. The
#: defaults are SlideSSL's own (:data:`~wsi_ssl.pretrain.SLIDE_SSL_DEFAULTS`), never copied here.
MODEL_OPTIONS: dict[str, tuple[type, str]] = {
    "head": (str, "aggregator: sparseconv, abmil, resmlp-mean, ... (wsi_ssl.mil heads)"),
    "embed_dim": (int, "slide embedding size"),
    "weight_decay": (float, "decoupled weight decay"),
    "warmup_epochs": (int, "linear warm-up epochs before the cosine decay"),
    "checkpoint_every": (int, "epochs between checkpoints"),
    "readers": (int, "threads reading batches ahead of the model (0: main thread)"),
    "device": (str, "auto, cpu, cuda, cuda:N"),
    "seed": (int, "seeds initialisation, view sampling and inference chunks"),
}
#: the settings a preset chooses (AUTO_PARAMS): no flag = the preset's value
PRESET_OPTIONS: dict[str, tuple[type, str]] = {
    "tiles_per_view": (int, "k tiles per view"),
    "batch_size": (int, "slides per step, clamped to the cohort size"),
    "epochs": (int, "passes over the slides"),
    "lr": (float, "peak learning rate"),
    "temperature": (float, "NT-Xent temperature"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="tile store (zarr) with an augmentation bank")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output model directory")
    for name, (kind, text) in MODEL_OPTIONS.items():
        p.add_argument(_flag(name), type=kind, default=SLIDE_SSL_DEFAULTS[name], help=text)
    p.add_argument("--head-option", action="append", default=[], metavar="KEY=VALUE",
                   type=_head_option, dest="head_kwargs",
                   help="option of the head, repeatable (e.g. pooling=mean, n_layers=2, "
                        "dropout=0.1); values are read as JSON numbers/booleans when they parse")
    p.add_argument("--preset", choices=SLIDE_SSL_PRESETS, default=DEFAULT_PRESET,
                   help="auto: settings from the cohort, bank and device (printed with the "
                        "reason); paper: Giga-SSL exactly")
    for name, (kind, text) in PRESET_OPTIONS.items():
        p.add_argument(_flag(name), type=kind, default=None, help=f"{text} (preset)")
    p.add_argument("--resume", action="store_true", help="continue from MODEL_DIR's checkpoint")


def _head_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. pooling=mean)")
    try:
        parsed: object = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


@contextmanager
def _print_info(name: str) -> Iterator[None]:
    """Print the INFO lines of logger ``name`` (SlideSSL's settings and summary) on stdout."""
    log = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.INFO)
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def model_params(args: argparse.Namespace) -> dict[str, object]:
    """The SlideSSL parameters of the parsed flags, under SlideSSL's own names: every
    :data:`MODEL_OPTIONS` flag, ``head_kwargs`` and the preset settings given as flags."""
    params: dict[str, object] = {name: getattr(args, name) for name in MODEL_OPTIONS}
    params["head_kwargs"] = dict(args.head_kwargs) or SLIDE_SSL_DEFAULTS["head_kwargs"]
    params.update({k: getattr(args, k) for k in AUTO_PARAMS if getattr(args, k) is not None})
    return params


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.pretrain import pretrain_slides  # lazy: torch, only when training

    explicit = {k: getattr(args, k) for k in AUTO_PARAMS if getattr(args, k) is not None}
    if args.preset == "paper":
        print("preset paper: " + " ".join(f"{k}={v}" for k, v in PAPER_SETTINGS.items())
              + " (Giga-SSL exactly)")
    else:
        print("preset auto: the settings not given as flags are chosen from the store at fit "
              "time")
    if explicit:
        print("overridden by flags: " + ", ".join(f"{k}={v}" for k, v in explicit.items()))
    with _print_info("wsi_ssl.pretrain._slide_ssl"):
        model = pretrain_slides(args.store, args.out, preset=args.preset, resume=args.resume,
                                **model_params(args))
    _print_summary(model, args.out)
    return 0


def _print_summary(model: Any, out: str) -> None:
    hist = model.history_
    print(f"{'slides':>8} {'skipped':>8} {'epochs':>7} {'first loss':>11} {'last loss':>10} "
          f"{'views/s':>9}")
    print(f"{len(model.slide_ids_):>8} {len(model.skipped_slides_):>8} {len(hist):>7} "
          f"{hist[0]:>11.4f} {hist[-1]:>10.4f} {model.train_views_per_s_:>9.0f}")
    if model.skipped_slides_:
        print("skipped (no tiles): " + ", ".join(model.skipped_slides_[:20]))
    if model.excluded_slides_:
        print("excluded (NaN/inf values): " + ", ".join(model.excluded_slides_[:20]))
    print(f"model written to {out} (model.safetensors, config.json, loss_curve.png)")
