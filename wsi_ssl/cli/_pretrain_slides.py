"""``wsi-ssl pretrain-slides``: Giga-SSL slide-level contrastive pretraining on a tile store."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE", help="tile store (zarr) with an augmentation bank")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output model directory")
    p.add_argument("--head", default="sparseconv",
                   help="aggregator: sparseconv, abmil, resmlp-mean, ... (wsi_ssl.mil heads)")
    p.add_argument("--head-option", action="append", default=[], metavar="KEY=VALUE",
                   type=_head_option,
                   help="option of the head, repeatable (e.g. pooling=mean, n_layers=2, "
                        "dropout=0.1); values are read as JSON numbers/booleans when they parse")
    p.add_argument("--preset", choices=("auto", "paper"), default="auto",
                   help="auto: settings from the cohort, bank and device (printed with the "
                        "reason); paper: Giga-SSL exactly")
    p.add_argument("--epochs", type=int, default=None, help="passes over the slides (preset)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="slides per step, clamped to the cohort size (preset)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (preset)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled weight decay")
    p.add_argument("--tiles-per-view", type=int, default=None, help="k tiles per view (preset)")
    p.add_argument("--temperature", type=float, default=None,
                   help="NT-Xent temperature (preset)")
    p.add_argument("--embed-dim", type=int, default=512, help="slide embedding size")
    p.add_argument("--checkpoint-every", type=int, default=1, help="epochs between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from MODEL_DIR's checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=0)


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


def run(args: argparse.Namespace) -> int:
    from wsi_ssl.pretrain import AUTO_PARAMS, PAPER_SETTINGS, pretrain_slides

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
        model = pretrain_slides(
            args.store, args.out, preset=args.preset, head=args.head,
            weight_decay=args.weight_decay, embed_dim=args.embed_dim,
            head_kwargs=dict(args.head_option) or None, checkpoint_every=args.checkpoint_every,
            resume=args.resume, device=args.device, seed=args.seed, **explicit)
    hist = model.history_
    print(f"{'slides':>8} {'skipped':>8} {'epochs':>7} {'first loss':>11} {'last loss':>10} "
          f"{'views/s':>9}")
    print(f"{len(model.slide_ids_):>8} {len(model.skipped_slides_):>8} {len(hist):>7} "
          f"{hist[0]:>11.4f} {hist[-1]:>10.4f} {model.train_views_per_s_:>9.0f}")
    if model.skipped_slides_:
        print("skipped (no tiles): " + ", ".join(model.skipped_slides_[:20]))
    if model.excluded_slides_:
        print("excluded (NaN/inf values): " + ", ".join(model.excluded_slides_[:20]))
    print(f"model written to {args.out} (model.safetensors, config.json, loss_curve.png)")
    return 0
