"""Settings of slide-level SSL chosen from the cohort: ``--preset auto`` and ``--preset paper``.

The rule (evidence in ``docs/slide-ssl.md``, "Presets"):

* ``paper``: Giga-SSL exactly (Lazard et al. 2023): k=5 tiles per view, batch 256, 3000 epochs,
  lr 0.03, temperature 0.05. Made for ~11k TCGA slides on a GPU.
* ``auto``, up to :data:`SMALL_COHORT` slides: the settings that won the project's ablation on
  40-128 generated slides whose label lives in 3-15 % of the tissue: k = 64 tiles per view
  (capped at the bank's tiles per version), 300 epochs, lr 1e-3, temperature 0.1, and a batch of
  about a quarter of the cohort (a power of two, 8-256; 32 at 128 slides, as measured). With
  k=5 every head stayed near mean pooling (AUC 0.61 / 0.75 / 0.82 at 8 / 16 / 32 labels against
  0.91-0.93 / 0.95-0.98 / 0.96-0.98 at k=64 with attention pooling); 600 epochs did not beat
  300; temperature 0.05-0.2 and lr 1e-3-3e-3 moved AUCs by ~0.01.
* ``auto``, larger cohorts: nothing was measured there, so the paper's batch, lr and temperature
  are kept, with k = 64 (capped at the bank) because the k=5 loss is about views missing small
  regions, not about cohort size; 3000 epochs on a GPU, 300 on a CPU (3000 passes over
  thousands of slides take days there).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

from wsi_ssl.errors import ConfigError

__all__ = ["SlideSSLPreset", "slide_ssl_preset", "preset_for_store", "SMALL_COHORT",
           "PAPER_SETTINGS"]

#: Largest cohort for which ``auto`` uses the measured small-cohort settings.
SMALL_COHORT: int = 1000
#: Giga-SSL's numbers (Lazard et al., CVPRW 2023), ``SlideSSL()``'s defaults.
PAPER_SETTINGS: dict[str, Any] = {"tiles_per_view": 5, "batch_size": 256, "epochs": 3000,
                                  "lr": 0.03, "temperature": 0.05}


@dataclass(frozen=True, kw_only=True)
class SlideSSLPreset:
    """Settings of :class:`~wsi_ssl.pretrain.SlideSSL` chosen by a preset.

    Attributes:
        name: ``"auto"`` or ``"paper"``.
        tiles_per_view: k, tiles per view.
        batch_size: slides per step (SlideSSL clamps it to the cohort).
        epochs: passes over the slides.
        lr: peak learning rate.
        temperature: NT-Xent temperature.
        reason: one or two sentences: the inputs and the evidence behind the choice.
    """

    name: Literal["auto", "paper"]
    tiles_per_view: int
    batch_size: int
    epochs: int
    lr: float
    temperature: float
    reason: str

    def settings(self) -> dict[str, Any]:
        """The SlideSSL keyword arguments: ``tiles_per_view, batch_size, epochs, lr,
        temperature``."""
        d = asdict(self)
        return {k: d[k] for k in PAPER_SETTINGS}

    def describe(self) -> str:
        """``preset auto: tiles_per_view=64 batch_size=32 ... -- because ...``."""
        values = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in self.settings().items())
        return f"preset {self.name}: {values}. {self.reason}"


def _power_of_two_at_most(n: float) -> int:
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def slide_ssl_preset(preset: Literal["auto", "paper"], *, n_slides: int, bank_tiles: int,
                     device: str = "cpu") -> SlideSSLPreset:
    """The SlideSSL settings of ``preset`` for a cohort (a pure function; the rule is in the
    module docstring).

    Args:
        preset: ``"auto"`` (from the cohort) or ``"paper"`` (Giga-SSL exactly).
        n_slides: slides with tiles that will be trained on.
        bank_tiles: tiles per augmented version in the store's bank (T of ``views`` (V, T, D));
            k above it would only repeat tiles.
        device: ``"cpu"`` or a CUDA device (``"cuda"``, ``"cuda:1"``).

    Raises:
        ConfigError: an unknown preset, ``n_slides < 2`` or ``bank_tiles < 1``.
    """
    if preset not in ("auto", "paper"):
        raise ConfigError(f"preset={preset!r} must be 'auto' or 'paper'.")
    if isinstance(n_slides, bool) or not isinstance(n_slides, int) or n_slides < 2:
        raise ConfigError(f"n_slides={n_slides!r}: slide SSL needs at least 2 slides with tiles.")
    if isinstance(bank_tiles, bool) or not isinstance(bank_tiles, int) or bank_tiles < 1:
        raise ConfigError(f"bank_tiles={bank_tiles!r} must be >= 1; embed the store with an "
                          "augmentation bank (wsi-ssl embed --views N --view-tiles T).")
    if preset == "paper":
        return SlideSSLPreset(name="paper", **PAPER_SETTINGS,
                              reason="Giga-SSL's settings (Lazard et al. 2023, ~11k TCGA slides "
                                     "on a GPU).")
    gpu = str(device).startswith("cuda")
    k = min(64, bank_tiles)
    k_why = (f"k={k}: 64 tiles per view won the ablation (k=5 stayed near mean pooling)"
             + (f", capped at the bank's {bank_tiles} tiles per version" if k < 64 else ""))
    if n_slides <= SMALL_COHORT:
        batch = min(256, max(8, _power_of_two_at_most(n_slides / 4)))
        return SlideSSLPreset(
            name="auto", tiles_per_view=k, batch_size=batch, epochs=300, lr=1e-3,
            temperature=0.1,
            reason=(f"{n_slides} slides (<= {SMALL_COHORT}): the settings that won the ablation "
                    f"on 40-128 slides ({k_why}; 300 epochs, lr 1e-3, temperature 0.1; batch "
                    f"{batch} = about a quarter of the cohort)."))
    epochs = 3000 if gpu else 300
    return SlideSSLPreset(
        name="auto", tiles_per_view=k, batch_size=256, epochs=epochs, lr=0.03, temperature=0.05,
        reason=(f"{n_slides} slides (> {SMALL_COHORT}, beyond the measured cohorts): the "
                f"paper's batch, lr and temperature; {k_why}; {epochs} epochs on "
                f"{'a GPU' if gpu else 'a CPU (3000 on a GPU)'}."))


def preset_for_store(store: str | os.PathLike, preset: Literal["auto", "paper"] = "auto", *,
                     device: str = "auto") -> SlideSSLPreset:
    """:func:`slide_ssl_preset` for the slides of a tile store: the slides with tiles, the
    smallest bank size among them, and the device ``"auto"`` resolves to."""
    from wsi_ssl._utils import resolve_device
    from wsi_ssl.store import TileStore

    ts = TileStore(store, mode="r")
    attrs = [ts.slide_attrs(s) or {} for s in ts.slide_ids]
    with_tiles = [a for a in attrs if int(a.get("n_tiles", 0)) > 0]
    banks = [int(a.get("view_tiles", 0)) for a in with_tiles if int(a.get("n_views", 0)) > 0]
    return slide_ssl_preset(preset, n_slides=len(with_tiles), bank_tiles=min(banks, default=0),
                            device=resolve_device(device).type)
