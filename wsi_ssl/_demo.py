"""The whole pipeline on a generated cohort, on a laptop CPU, in minutes: ``wsi-ssl demo``.

Steps (each is skipped when its output already exists, so a rerun resumes)::

    1. make_cohort          generated pyramidal TIFF slides + labels.csv (label, survival)
    2. tile QC              tissue mask + tile grid picture of one slide
    3. embed                tile embeddings + the Giga-SSL augmentation bank -> zarr TileStore
    4. pretrain-slides      SlideSSL (Giga-SSL) on the store, no labels
    5. encode-slides        compact slide embeddings (.npz)
    6. probe + survival     few-shot linear probes (SSL vs mean pooling) and a Cox model
    7. report               report.md / report.html with the pictures

The same calls, with a GPU, real slides and bigger numbers, are what a TCGA run does.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo run (defaults: ~3-5 minutes on 2 CPU cores)."""

    n_slides: int = 40
    seed: int = 0
    tile_size: int = 112
    mpp: float = 0.5
    encoder: str = "tiny-cnn"
    views: int = 16
    view_tiles: int = 64
    slide_epochs: int = 60
    n_labeled: tuple[int, ...] = (8, 16, 32)
    repeats: int = 10
    device: str = "auto"
    n_workers: int | None = None


@dataclass(frozen=True)
class DemoResult:
    out_dir: Path
    summary: dict[str, Any]
    report_md: Path
    report_html: Path
    seconds: dict[str, float] = field(default_factory=dict)


def _step(name: str, say: Callable[[str], None], timings: dict[str, float]):
    class _Timer:
        def __enter__(self):
            say(f"[{len(timings) + 1}] {name} ...")
            self.t = time.perf_counter()
            return self

        def __exit__(self, *exc):
            timings[name] = time.perf_counter() - self.t
            if exc[0] is None:
                say(f"    done in {timings[name]:.1f} s")
            return False

    return _Timer()


def run_demo(out_dir: str | os.PathLike = "wsi-ssl-demo", config: DemoConfig | None = None,
             *, say: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole pipeline into ``out_dir`` and return the summary (also in ``summary.json``).

    ``say`` receives one line per step (the CLI passes ``print``); the library itself only logs.
    """
    raise NotImplementedError  # filled in once the stages land
