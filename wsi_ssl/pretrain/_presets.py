"""Settings of slide-level SSL chosen from the cohort: ``SlideSSL(tiles_per_view="auto", ...)``,
``--preset auto`` and ``--preset paper``.

``tiles_per_view``, ``batch_size``, ``epochs``, ``lr`` and ``temperature`` of
:class:`~wsi_ssl.pretrain.SlideSSL` each accept ``"auto"``; ``fit`` resolves them from the store's
metadata (slides with tiles, the bank's tiles per version) and the device with
:func:`resolve_settings` and stores the values as ``tiles_per_view_``, ``batch_size_``... An
explicit ``tiles_per_view`` larger than the bank's tiles per version is refused.

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

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Literal

from wsi_ssl._validation import Interval, Options, validate_params
from wsi_ssl.errors import ConfigError

__all__ = ["SlideSSLPreset", "slide_ssl_preset", "SMALL_COHORT", "PAPER_SETTINGS",
           "AUTO_PARAMS", "SLIDE_SSL_DEFAULTS", "DEFAULT_PRESET", "SLIDE_SSL_PRESETS", "ResolvedSettings",
           "resolve_settings"]

#: Largest cohort for which ``auto`` uses the measured small-cohort settings.
SMALL_COHORT: int = 1000
#: Giga-SSL's numbers (Lazard et al., CVPRW 2023), ``SlideSSL()``'s defaults.
PAPER_SETTINGS: dict[str, Any] = {"tiles_per_view": 5, "batch_size": 256, "epochs": 3000,
                                  "lr": 0.03, "temperature": 0.05}
#: SlideSSL parameters that accept ``"auto"`` (the settings a preset chooses).
AUTO_PARAMS: tuple[str, ...] = tuple(PAPER_SETTINGS)
#: The defaults of :class:`~wsi_ssl.pretrain.SlideSSL` (all its parameters but
#: ``coord_augment``, whose default is ``CoordAugment()``): the one copy, read by SlideSSL's
#: signature, :func:`~wsi_ssl.pretrain.pretrain_slides` and ``wsi-ssl pretrain-slides`` (kept
#: here, free of torch, so that ``wsi-ssl --help`` shows them without loading torch).
SLIDE_SSL_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "head": "sparseconv", "embed_dim": 512, "proj_dims": (512, 512, 256), **PAPER_SETTINGS,
    "weight_decay": 5e-4, "warmup_epochs": 10, "optimizer": "adamw", "head_kwargs": None,
    "standardize": True, "inference_chunks": None, "inference_batch": 2048,
    "cache_bytes": 2 * 1024**3, "readers": 2, "checkpoint_dir": None, "checkpoint_every": 1,
    "device": "auto", "seed": 0})
#: The preset of ``pretrain_slides`` and ``wsi-ssl pretrain-slides`` (``SlideSSL()`` itself
#: defaults to the paper's numbers).
DEFAULT_PRESET: Literal["auto", "paper"] = "auto"


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


#: the preset names
SLIDE_SSL_PRESETS: tuple[str, ...] = ("auto", "paper")
#: the constraint of ``preset=``
PRESETS = Options(SLIDE_SSL_PRESETS)


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
    validate_params("slide_ssl_preset", {"preset": preset}, {"preset": [PRESETS]})
    validate_params("slide_ssl_preset", {"n_slides": n_slides},
                    {"n_slides": [Interval(int, 2, None)]},
                    hint="Slide SSL needs at least 2 slides with tiles.")
    validate_params("slide_ssl_preset", {"bank_tiles": bank_tiles},
                    {"bank_tiles": [Interval(int, 1, None)]},
                    hint="Embed the store with an augmentation bank (wsi-ssl embed --views N "
                         "--view-tiles T).")
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


@dataclass(frozen=True, kw_only=True)
class ResolvedSettings:
    """The settings a :class:`~wsi_ssl.pretrain.SlideSSL` run uses once ``"auto"`` is resolved.

    Attributes:
        tiles_per_view, batch_size, epochs, lr, temperature: the values (``batch_size`` clamped
            to the number of slides).
        auto: the parameters that were ``"auto"``.
        reason: why the ``"auto"`` ones have their values ("" when none was ``"auto"``).
    """

    tiles_per_view: int
    batch_size: int
    epochs: int
    lr: float
    temperature: float
    auto: tuple[str, ...] = ()
    reason: str = ""

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in AUTO_PARAMS}

    def describe(self) -> str:
        """``tiles_per_view=64 (auto) batch_size=32 (given) ... auto: <reason>``."""
        vals = " ".join(
            (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
            + (" (auto)" if k in self.auto else " (given)") for k, v in self.settings().items())
        return f"{vals}" + (f". auto: {self.reason}" if self.auto else "")


def resolve_settings(params: dict[str, Any], *, n_slides: int, bank_tiles: int,
                     device: str = "cpu", store: str = "") -> ResolvedSettings:
    """Resolve the ``"auto"`` values among ``params`` (SlideSSL's ``get_params()``) with the
    ``auto`` rule of :func:`slide_ssl_preset`, and check the explicit ``tiles_per_view``.

    Args:
        params: SlideSSL parameters (``tiles_per_view``, ``batch_size``, ``epochs``, ``lr``,
            ``temperature``: numbers or ``"auto"``).
        n_slides: slides trained on (with tiles, finite, with a bank).
        bank_tiles: tiles per augmented version of the store's bank.
        device: the torch device type the run uses.
        store: the store path, for messages.

    Raises:
        ConfigError: an explicit ``tiles_per_view`` larger than ``bank_tiles``.
    """
    preset = slide_ssl_preset("auto", n_slides=n_slides, bank_tiles=bank_tiles, device=device)
    auto = tuple(k for k in AUTO_PARAMS if isinstance(params[k], str) and params[k] == "auto")
    values = {k: (preset.settings()[k] if k in auto else params[k]) for k in AUTO_PARAMS}
    tiles_per_view = int(values["tiles_per_view"])
    if "tiles_per_view" not in auto and tiles_per_view > bank_tiles:
        raise ConfigError(
            f"SlideSSL tiles_per_view={tiles_per_view} is larger than the view bank of tile "
            f"store '{store}' ({bank_tiles} tiles per augmented version): a view would only "
            f"repeat tiles. Use tiles_per_view <= {bank_tiles} or 'auto', or re-embed with "
            f"--view-tiles {tiles_per_view}.")
    return ResolvedSettings(
        tiles_per_view=tiles_per_view,
        batch_size=min(int(values["batch_size"]), int(n_slides)), epochs=int(values["epochs"]),
        lr=float(values["lr"]), temperature=float(values["temperature"]), auto=auto,
        reason=preset.reason if auto else "")
