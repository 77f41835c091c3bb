"""Building a slide-encoder preset with its weights, and running it on one slide's tiles.

The machinery is the tile presets': the architecture is built on the ``meta`` device, the file
is found by :func:`wsi_ssl.encoders._hub.resolve_weights` (file, ``--local-dir`` folder, local
Hugging Face cache), read with ``weights_only=True`` (:func:`~wsi_ssl.encoders._weights.read_weights`),
matched key by key (:func:`~wsi_ssl.encoders._weights.match_state_dict`; parts of the checkpoint
that are not built, such as text towers, are listed per preset and ignored) and assigned
strictly (:func:`~wsi_ssl.encoders._loading.assign_state_dict`). A file of another slide encoder
is named ("looks like 'gigapath-slide' weights, not 'titan'").
"""

from __future__ import annotations

import difflib
import functools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from wsi_ssl.encoders._hub import resolve_weights
from wsi_ssl.encoders._loading import (
    _Shape,
    assign_state_dict,
    identify_weights,
    init_random_,
    misfit_error,
)
from wsi_ssl.encoders._weights import match_state_dict, read_weights
from wsi_ssl.encoders.slide._abmil import ABMILSlideModel
from wsi_ssl.encoders.slide._gigapath import LongNetSlideModel
from wsi_ssl.encoders.slide._presets import (
    _BY_NAME,
    SLIDE_PRESETS,
    SlideEncoderPreset,
    get_slide_preset,
)
from wsi_ssl.encoders.slide._prism import PrismSlideModel
from wsi_ssl.encoders.slide._titan import TitanSlideModel
from wsi_ssl.errors import ConfigError, InputError, WeightsError

__all__ = ["SlideEncoder", "create_slide_encoder", "build_slide_model", "slide_expected_shapes",
           "identify_slide_weights", "grid_positions", "slide_param_count"]

logger = logging.getLogger(__name__)

INIT_SEED = 0
#: architecture keyword arguments holding (tile feature dimension, slide embedding dimension)
_DIM_KEYS = {"titan": ("in_dim", "dim"), "longnet-vit": ("in_dim", "dim"),
             "prism-perceiver": ("context_dim", "latent_dim"), "abmil": ("in_dim", "embed_dim")}


def _module(preset: SlideEncoderPreset, overrides: Mapping[str, Any] | None) -> nn.Module:
    kw = {**preset.kwargs, **(overrides or {})}
    if preset.arch == "titan":
        return TitanSlideModel(**kw)
    if preset.arch == "longnet-vit":
        return LongNetSlideModel(**kw)
    if preset.arch == "prism-perceiver":
        if "depth" in kw:  # the spelling shared by every preset (tests, identification)
            kw["perceiver_depth"] = kw.pop("depth")
        return PrismSlideModel(**kw)
    if "depth" in kw:
        raise TypeError("ABMIL has no depth")
    return ABMILSlideModel(**kw)


def build_slide_model(preset: SlideEncoderPreset, overrides: Mapping[str, Any] | None = None, *,
                      meta: bool = True) -> nn.Module:
    """The preset's architecture (``meta=True``: on the meta device, no memory)."""
    if meta:
        with torch.device("meta"):
            return _module(preset, overrides)
    return _module(preset, overrides)


@functools.lru_cache(maxsize=64)
def _shapes_cached(name: str, overrides: tuple[tuple[str, Any], ...]
                   ) -> dict[str, tuple[int, ...]]:
    preset = get_slide_preset(name)
    model = build_slide_model(preset, dict(overrides))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def slide_expected_shapes(preset: SlideEncoderPreset,
                          overrides: Mapping[str, Any] | None = None
                          ) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` a checkpoint of ``preset`` must hold (tied modules under every name)."""
    return dict(_shapes_cached(preset.name, tuple(sorted((overrides or {}).items()))))


def slide_param_count(preset: SlideEncoderPreset,
                      overrides: Mapping[str, Any] | None = None) -> int:
    """Parameters of the architecture (meta build; shared modules counted once)."""
    return sum(math.prod(p.shape) for p in build_slide_model(preset, overrides).parameters())


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict keys naming one shared parameter (PRISM's shared Perceiver layers)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _fill_aliases(sd: dict[str, torch.Tensor], groups: list[list[str]], path: Any
                  ) -> dict[str, torch.Tensor]:
    """A checkpoint may store a shared parameter once (``save_pretrained`` drops duplicates) or
    under every name; fill the missing names, and refuse names that disagree."""
    sd = dict(sd)
    for group in groups:
        present = [k for k in group if k in sd]
        if not present:
            continue
        ref = sd[present[0]]
        for k in present[1:]:
            if hasattr(ref, "data_ptr") and (sd[k].shape != ref.shape
                                             or not torch.equal(sd[k], ref)):
                raise WeightsError(f"weights '{path}': {k} and {present[0]} must be the same "
                                   "(shared) tensor in this architecture but differ.")
        for k in group:
            sd.setdefault(k, ref)
    return sd


def identify_slide_weights(sd: Mapping[str, Any], *, exclude: str | None = None,
                           overrides: Mapping[str, Any] | None = None) -> str | None:
    """The slide preset whose architecture (with ``overrides``) ``sd`` matches exactly, or
    ``None``. Meta builds, cached."""
    for preset in SLIDE_PRESETS:
        if preset.name == exclude:
            continue
        try:
            own = slide_expected_shapes(preset, overrides)
            groups = _alias_groups(build_slide_model(preset, overrides))
        except (TypeError, ValueError):  # an override this architecture does not take
            continue
        src = _fill_aliases({k: _Shape(v.shape) for k, v in sd.items()}, groups, "")
        _, problems = match_state_dict(src, own, ignore=preset.ignore)
        if not problems:
            return preset.name
    return None


def _load(preset: SlideEncoderPreset, path: Path, overrides: Mapping[str, Any] | None
          ) -> nn.Module:
    raw = read_weights(path)
    model = build_slide_model(preset, overrides)
    groups = _alias_groups(model)
    sd, problems = match_state_dict(_fill_aliases(raw, groups, path), model.state_dict(),
                                    ignore=preset.ignore)
    if problems:
        other = identify_slide_weights(raw, exclude=preset.name, overrides=overrides)
        if other is None:
            tile = identify_weights(raw, overrides=overrides)
            if tile is not None:
                problems.append(f"it looks like the weights of the tile encoder {tile!r}")
        raise misfit_error(path=path, name=preset.name, problems=problems, other=other,
                           expected=f"{preset.hub_repo}'s {' or '.join(preset.weight_files)}",
                           overrides=overrides, kind="slide encoder",
                           factory="create_slide_encoder", flag="--slide-encoder")
    del raw
    assign_state_dict(model, sd, path=path, name=preset.name, kind="slide encoder")
    return model


def _random(preset: SlideEncoderPreset, overrides: Mapping[str, Any] | None,
            seed: int) -> nn.Module:
    """A deterministic random instance (tests, architecture checks): matrices N(0, 0.02),
    biases 0, norm weights 1, drawn in key order."""
    model = build_slide_model(preset, overrides).to_empty(device="cpu")
    return init_random_(model, seed)


def grid_positions(preset: SlideEncoderPreset, coords: np.ndarray,
                   stride_level0: float | None) -> np.ndarray | None:
    """The grid cells ``(N, 2)`` int64 the slide encoder takes, from level-0 ``coords`` and the
    grid's ``stride_level0`` (``None`` for encoders without positions; see
    :mod:`~wsi_ssl.encoders.slide._presets`).

    Raises:
        InputError: positions are needed and the stride is missing or not positive, or the
            cells fall outside the model's position table.
    """
    if preset.positions == "none":
        return None
    if stride_level0 is None or not np.isfinite(stride_level0) or stride_level0 <= 0:
        raise InputError(f"slide encoder {preset.name!r} needs the tile grid's stride "
                         f"(stride_level0 attribute of the slide); got {stride_level0!r}. "
                         "Re-embed the slides with `wsi-ssl embed` (it records it).")
    c = np.asarray(coords, np.float64).reshape(-1, 2)
    if preset.positions == "grid-origin" and len(c):
        c = c - c.min(axis=0)
    cells = np.rint(c / float(stride_level0)).astype(np.int64)
    if preset.positions == "grid-absolute" and len(cells):
        side = int(preset.kwargs.get("slide_ngrids", 1000))
        if cells.min() < 0 or cells.max() >= side:
            raise InputError(f"slide encoder {preset.name!r}: tiles reach grid cell "
                             f"{tuple(int(v) for v in cells.max(axis=0))} at stride "
                             f"{stride_level0:g} level-0 px, outside its {side} x {side} "
                             "position table (a slide wider than "
                             f"{side * stride_level0:,.0f} level-0 px).")
    return cells


class SlideEncoder:
    """A slide-encoder preset with its weights, a device and a precision.

    ``encode(features, coords, stride_level0)`` embeds one slide; ``encode_many`` a list of
    them (one forward per slide, or padded batches for architectures where padding is exact).

    Attributes:
        preset: the :class:`SlideEncoderPreset`.
        model: the ``nn.Module`` (eval mode).
        weights: the weights file, or ``None`` (random weights: features mean nothing).
        device, precision: where and in which precision it runs.
    """

    def __init__(self, preset: SlideEncoderPreset, model: nn.Module, *, weights: Path | None,
                 device: str = "auto", overrides: Mapping[str, Any] | None = None) -> None:
        self.preset = preset
        self.weights = weights
        self.overrides = dict(overrides or {})
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.precision = preset.precision if self.device.type == "cuda" else "float32"
        self.model = model.to(self.device).eval()
        kw = {**preset.kwargs, **self.overrides}
        tile_key, out_key = _DIM_KEYS[preset.arch]
        #: tile feature dimension and embedding length (the preset's unless overridden)
        self.tile_dim = int(kw.get(tile_key, preset.tile_dim))
        self.embed_dim = int(kw.get(out_key, preset.embed_dim))

    @property
    def name(self) -> str:
        return self.preset.name

    def describe(self) -> dict[str, Any]:
        """JSON-friendly provenance: preset, weights file, device, precision."""
        w = self.weights
        return {"name": self.preset.name, "hub_repo": self.preset.hub_repo,
                "weights": None if w is None else str(w),
                "weights_bytes": None if w is None else Path(w).stat().st_size,
                "random_weights": w is None, "overrides": self.overrides or None,
                "tile_encoder": self.preset.tile_encoder, "mpp": self.preset.mpp,
                "tile_size": self.preset.tile_size, "positions": self.preset.positions,
                "output": self.preset.output, "device": str(self.device),
                "precision": self.precision, "license": self.preset.license}

    def _autocast(self):
        if self.precision == "float32":
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=getattr(torch, self.precision))

    def encode(self, features: np.ndarray, coords: np.ndarray | None = None,
               stride_level0: float | None = None) -> np.ndarray:
        """One slide's embedding.

        Shape:
            features ``(N, tile_dim)``; coords ``(N, 2)`` level-0 ``(x, y)``; returns
            ``(embed_dim,)`` float32.
        """
        return self.encode_many([(features, coords, stride_level0)])[0]

    def encode_many(self, slides: Sequence[tuple[np.ndarray, np.ndarray | None, float | None]],
                    *, batch_size: int = 8) -> np.ndarray:
        """Embeddings ``(len(slides), embed_dim)`` float32 of ``(features, coords,
        stride_level0)`` triples."""
        p = self.preset
        out = np.zeros((len(slides), self.embed_dim), np.float32)
        step = max(1, int(batch_size)) if p.batched else 1
        for start in range(0, len(slides), step):
            chunk = slides[start:start + step]
            for f, _, _ in chunk:
                if np.ndim(f) != 2 or np.shape(f)[1] != self.tile_dim or not len(f):
                    raise InputError(f"slide encoder {p.name!r} takes (N >= 1, {self.tile_dim}) "
                                     f"tile features; got shape {np.shape(f)}.")
            with torch.inference_mode(), self._autocast():
                if p.batched:
                    out[start:start + len(chunk)] = self._batched([f for f, _, _ in chunk])
                else:
                    f, c, s = chunk[0]
                    cells = grid_positions(p, c, s)
                    x = torch.as_tensor(np.asarray(f, np.float32), device=self.device)
                    g = torch.as_tensor(cells, device=self.device)
                    out[start] = self.model(x, g).float().cpu().numpy()
        return out

    def _batched(self, feats: list[np.ndarray]) -> np.ndarray:
        n = max(len(f) for f in feats)
        x = torch.zeros(len(feats), n, self.tile_dim, device=self.device)
        mask = torch.zeros(len(feats), n, dtype=torch.bool, device=self.device)
        for i, f in enumerate(feats):
            x[i, :len(f)] = torch.as_tensor(np.asarray(f, np.float32), device=self.device)
            mask[i, :len(f)] = True
        return self.model(x, None if bool(mask.all()) else mask).float().cpu().numpy()


def create_slide_encoder(name: str, *, weights: str | os.PathLike | None = None,
                         device: str = "auto", random_weights: bool = False,
                         model_kwargs: Mapping[str, Any] | None = None) -> SlideEncoder:
    """Build a slide-encoder preset (``list_slide_encoders()``) with its weights.

    Args:
        name: ``"titan"``, ``"gigapath-slide"``, ``"prism"``, ``"feather"``, ... (or an alias).
        weights: a file, a folder written by ``huggingface-cli download REPO --local-dir DIR``,
            or ``None``: the preset's hub repo in the local Hugging Face cache (offline).
        device: ``"auto"`` (CUDA if available, with the published precision), ``"cpu"``,
            ``"cuda"``, ``"cuda:N"``.
        random_weights: a deterministic random instance instead (tests, architecture checks,
            honest random-weight baselines; its embeddings carry no pretraining).
        model_kwargs: architecture keyword arguments replacing the preset's (e.g. ``{"depth":
            1}`` for a fast test instance).

    Raises:
        ConfigError: unknown name (with the closest matches) or conflicting options.
        WeightsError: weights missing (with the download command), unreadable or mismatched.
    """
    preset = get_slide_preset(name)
    if preset is None:
        close = difflib.get_close_matches(str(name).lower(), list(_BY_NAME), n=4, cutoff=0.5)
        raise ConfigError(f"unknown slide encoder {name!r}; known: "
                          f"{', '.join(p.name for p in SLIDE_PRESETS)}"
                          + (f" (closest: {close})" if close else "") + ".")
    if random_weights and weights is not None:
        raise ConfigError("pass weights= or random_weights=True, not both.")
    overrides = dict(model_kwargs or {})
    if random_weights:
        model, path = _random(preset, overrides, INIT_SEED), None
    else:
        path = resolve_weights(preset, weights)
        model = _load(preset, Path(path), overrides)
    n = sum(math.prod(p.shape) for p in model.parameters())
    logger.info("slide encoder %s: %.1f M parameters, weights %s", preset.name, n / 1e6,
                path if path is not None else "random (no pretraining)")
    return SlideEncoder(preset, model, weights=None if path is None else Path(path).absolute(),
                        device=device, overrides=overrides)
