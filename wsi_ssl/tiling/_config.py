"""The settings of tiling and embedding: :class:`EmbedConfig`, the one source of every default.

``embed_slides``, ``tile_grid``, ``tile_slides`` and the ``wsi-ssl embed`` / ``wsi-ssl tile``
options take their defaults from the fields of :class:`EmbedConfig`; :func:`grid_settings`
is the one place where an encoder preset supplies ``mpp`` / ``tile_size`` (both commands cut the
same grid for the same encoder). ``mpp`` is always the *target* resolution of the tiles;
the slide's own scan resolution is ``slide_mpp``.

Light on purpose (no torch): ``wsi-ssl --help`` and :func:`~wsi_ssl.tiling.tile_grid` import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

from wsi_ssl.augment import get_augment_config
from wsi_ssl.errors import ConfigError

__all__ = ["EmbedConfig", "grid_settings", "embed_config", "PRESET_FIELDS", "SETTINGS_KEYS"]

logger = logging.getLogger(__name__)

#: the settings that decide the stored features (hashed per slide: a rerun with the same ones
#: skips complete slides); the names and values are those of the stores made before EmbedConfig
SETTINGS_KEYS = ("mpp", "tile_size", "overlap", "min_tissue", "views", "view_tiles",
                 "augment_cfg", "seed", "dtype", "fingerprint", "backend")
#: the fields an encoder preset supplies when they are not given
PRESET_FIELDS = ("mpp", "tile_size")
#: fields used by a run but not stored in a slide's ``embed_settings``
_RUN_ONLY = ("batch_size", "read_threads", "prefetch", "device", "assume_mpp")


def _number(name: str, val: Any, lo: float, *, integer: bool = False, strict: bool = False
            ) -> None:
    ok = (not isinstance(val, bool) and isinstance(val, (int, float))
          and (val > lo if strict else val >= lo) and (not integer or float(val).is_integer()))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name}={val!r} must be {kind} {'>' if strict else '>='} {lo}.")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig:
    """The settings of :func:`~wsi_ssl.tiling.embed_slides` (validated on construction); its
    field defaults are the defaults of ``tile_grid``, ``tile_slides`` and the CLI too.

    Attributes:
        mpp: target resolution of the tiles in µm/px (> 0); not the slide's own ``slide_mpp``.
        tile_size: tile edge in px at that resolution (>= 8).
        overlap: grid overlap in px; min_tissue: min tissue fraction per tile, in [0, 1].
        views: ``V`` augmented versions per slide (Giga-SSL bank; 0 = none; paper: 50).
        view_tiles: ``T`` tiles per version (sampled with replacement when the slide has fewer).
        augment: augmentation preset name or :class:`~wsi_ssl.augment.AugmentConfig` (a dict
            of its fields is turned into one).
        seed: seeds the view sampling, per slide together with the slide id.
        dtype: storage dtype of features/views.
        assume_mpp: the slide's own µm/px for slides without MPP metadata (recorded as assumed).
        backend: slide reader backend (:func:`wsi_ssl.tiling.open_slide`).
        batch_size: tiles per encoder call; read_threads: tile-reading threads per slide
            (``read_tiles(read_threads=)``);
        prefetch: tile batches read ahead of the encoder.
        device: encoder device on each worker (``"auto"``: its GPU if any).
        settings_from_preset: the encoder preset whose ``mpp`` / ``tile_size`` were used
            because none were given (``None``: given, or these field defaults).
    """

    mpp: float = 0.5
    tile_size: int = 224
    overlap: int = 0
    min_tissue: float = 0.25
    views: int = 0
    view_tiles: int = 256
    augment: Any = "histo"
    seed: int = 0
    dtype: Literal["float16", "float32"] = "float16"
    assume_mpp: float | None = None
    backend: str = "auto"
    batch_size: int = 64
    read_threads: int | None = None
    prefetch: int = 4
    device: str = "auto"
    settings_from_preset: str | None = None

    def __post_init__(self) -> None:
        _number("mpp", self.mpp, 0, strict=True)
        for name, lo in (("tile_size", 8), ("batch_size", 1), ("view_tiles", 1), ("overlap", 0),
                         ("seed", 0), ("prefetch", 1)):
            _number(name, getattr(self, name), lo, integer=True)
        if isinstance(self.views, bool) or not isinstance(self.views, int) or self.views < 0:
            raise ConfigError(f"views={self.views!r} must be an integer >= 0 (0 = no "
                              "augmentation bank).")
        _number("min_tissue", self.min_tissue, 0)
        if self.min_tissue > 1:
            raise ConfigError(f"min_tissue={self.min_tissue!r} must be a fraction in [0, 1].")
        if self.overlap >= self.tile_size:
            raise ConfigError(f"overlap={self.overlap!r} must be smaller than "
                              f"tile_size={self.tile_size}.")
        self._check_optional()
        cfg = get_augment_config(self.augment)  # raises ConfigError for an unknown preset
        for name, cast in (("mpp", float), ("tile_size", int), ("overlap", int),
                           ("min_tissue", float), ("view_tiles", int), ("seed", int),
                           ("batch_size", int), ("prefetch", int)):
            object.__setattr__(self, name, cast(getattr(self, name)))
        if not isinstance(self.augment, str):
            object.__setattr__(self, "augment", cfg)
        object.__setattr__(self, "_augment_cfg", cfg)

    def _check_optional(self) -> None:
        if self.assume_mpp is not None:
            _number("assume_mpp", self.assume_mpp, 0, strict=True)
        if self.dtype not in ("float16", "float32"):
            raise ConfigError(f"dtype={self.dtype!r} must be 'float16' or 'float32'.")
        if self.read_threads is not None:
            _number("read_threads", self.read_threads, 1, integer=True)
        if not isinstance(self.device, str) or not isinstance(self.backend, str):
            raise ConfigError(f"device={self.device!r} and backend={self.backend!r} must be "
                              "strings.")

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (what every caller and CLI option falls back to)."""
        return cls.__dataclass_fields__[name].default

    @property
    def augment_config(self) -> Any:
        """The :class:`~wsi_ssl.augment.AugmentConfig` of ``augment``."""
        return self._augment_cfg  # type: ignore[attr-defined]

    def hash_fields(self, fingerprint: str) -> dict[str, Any]:
        """The settings that decide the stored features, with the encoder's fingerprint
        (what a slide's ``settings_hash`` is computed from)."""
        d = {k: getattr(self, k) for k in SETTINGS_KEYS if hasattr(self, k) and k != "augment"}
        d.update(augment_cfg=self.augment_config.to_dict(), fingerprint=fingerprint)
        return {k: d[k] for k in SETTINGS_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly settings; the store's slide attrs hold them as ``embed_settings``
        (without the run-only ``batch_size``, ``read_threads``, ``prefetch``, ``device``)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "augment"}
        d.update(augment_cfg=self.augment_config.to_dict(),
                 augment_preset=self.augment if isinstance(self.augment, str) else None)
        return json.loads(json.dumps(d))  # plain JSON types (lists, not tuples)

    def stored_settings(self) -> dict[str, Any]:
        """``to_dict()`` less the run-only settings (``embed_settings`` of the slide attrs)."""
        d = self.to_dict()
        for k in _RUN_ONLY:
            d.pop(k)
        return d


def grid_settings(encoder: Any = None, *, mpp: float | None = None,
                  tile_size: int | None = None) -> tuple[float, int, str | None]:
    """``(mpp, tile_size, preset name or None)`` of the grid for ``encoder``: what is given,
    else the encoder preset's (the resolution it was trained at), else the
    :class:`EmbedConfig` defaults. Shared by ``embed_slides``, ``wsi-ssl embed`` and
    ``wsi-ssl tile --encoder``, so both commands cut the same grid for the same encoder."""
    if mpp is not None and tile_size is not None:
        return mpp, tile_size, None
    preset = None
    name = getattr(encoder, "name", encoder)
    if isinstance(name, (str, os.PathLike)):
        from wsi_ssl.encoders import get_preset  # lazy: wsi_ssl.encoders imports torch

        preset = get_preset(str(name))
    if preset is None:
        return (EmbedConfig.default("mpp") if mpp is None else mpp,
                EmbedConfig.default("tile_size") if tile_size is None else tile_size, None)
    out_mpp = preset.mpp if mpp is None else mpp
    out_size = preset.tile_size if tile_size is None else tile_size
    logger.info("%s from the %r preset (the resolution it was trained at)",
                " and ".join(s for s, given in ((f"mpp={out_mpp} µm/px", mpp),
                                                (f"tile_size={out_size} px", tile_size))
                             if given is None), preset.name)
    return out_mpp, out_size, preset.name


def _check_names(overrides: dict[str, Any]) -> None:
    fields = [f for f in EmbedConfig.__dataclass_fields__ if f != "settings_from_preset"]
    for key in overrides:
        if key not in EmbedConfig.__dataclass_fields__:
            close = difflib.get_close_matches(key, fields, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConfigError(f"embed_slides() got an unknown setting {key}={overrides[key]!r}; "
                              f"{hint}the settings are the EmbedConfig fields: "
                              f"{', '.join(fields)}.")


def embed_config(encoder: Any, config: EmbedConfig | None, overrides: dict[str, Any]
                 ) -> EmbedConfig:
    """The :class:`EmbedConfig` of one ``embed_slides`` call: ``config`` (default: the field
    defaults, with ``mpp`` / ``tile_size`` from the encoder preset unless given) with
    ``overrides`` (EmbedConfig field names) applied by ``dataclasses.replace``; an override
    ``mpp=None`` / ``tile_size=None`` counts as not given."""
    _check_names(overrides)
    if config is not None and not isinstance(config, EmbedConfig):
        raise ConfigError(f"config={config!r} must be an EmbedConfig.")
    given = {k: v for k, v in overrides.items() if not (k in PRESET_FIELDS and v is None)}
    if config is not None:
        return dataclasses.replace(config, **given)
    mpp, size, preset = grid_settings(encoder, mpp=given.get("mpp"),
                                      tile_size=given.get("tile_size"))
    given.update(mpp=mpp, tile_size=size)
    given.setdefault("settings_from_preset", preset)
    return EmbedConfig(**given)
