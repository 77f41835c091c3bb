"""The encoder registry and factory (timm style): ``create_encoder``, ``list_encoders``,
``register_encoder``.

A name is looked up among the foundation-model presets first (``uni``, ``virchow2``, ...: exact
architecture, preprocessing and output rule, weights from local files or the local Hugging Face
cache), then in our registry (small CPU encoders, user registrations), then in timm
(``timm.create_model(name, pretrained=False, num_classes=0)``: never a download). Weights come only
from local files. Models built without weights are initialised under a fixed seed, so two
processes building the same name get the same weights and the same fingerprint.

A timm name has no built-in weights: built without ``weights=`` it is a random initialisation,
which ``create_encoder`` warns about once per process per name (a
:class:`~wsi_ssl.errors.RandomWeightsWarning`; ``random_weights=True`` says it is on purpose)
and ``wsi-ssl embed`` refuses without ``--random-weights``.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_ssl.encoders import _tiny
from wsi_ssl.encoders._encoder import IMAGENET_MEAN, IMAGENET_STD, SPEC_BUILDER, TileEncoder
from wsi_ssl.encoders._hub import resolve_weights
from wsi_ssl.encoders._loading import activation_bytes, build_preset_model
from wsi_ssl.encoders._presets import (
    _BY_NAME,
    get_preset,
    is_builtin,
    list_presets,
    preset_from_dict,
    register_preset,
)
from wsi_ssl.encoders._weights import (
    CHECKPOINT_FORMAT,
    load_weights_into,
    read_checkpoint_metadata,
)
from wsi_ssl.errors import ConfigError, EncoderMismatchError, RandomWeightsWarning, WeightsError

__all__ = ["create_encoder", "register_encoder", "EncoderEntry",
           "encoder_from_spec", "has_builtin_weights", "weights_kind", "warn_random_weights"]

INIT_SEED = 0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderEntry:
    """A registered encoder: ``builder() -> nn.Module`` mapping ``(B, 3, S, S)`` to ``(B, D)``."""

    name: str
    builder: Callable[[], Any]
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    embed_dim: int | None = None  # known up front: ``embed_slides`` need not build the model


_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(name: str, builder: Callable[[], Any] | None = None, *, input_size: int = 224,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     description: str = "", overwrite: bool = False,
                     embed_dim: int | None = None):
    """Register ``builder`` under ``name`` (usable as a decorator when ``builder`` is omitted).

    Args:
        name: the registry name (``create_encoder(name)``).
        builder: a no-argument callable returning an ``nn.Module`` that maps normalised
            ``(B, 3, input_size, input_size)`` float tiles to ``(B, D)`` features.
        input_size: tile edge (px) the model expects; tiles are resized to it.
        mean, std: RGB normalisation on the [0, 1] scale.
        description: one line shown by ``list_encoders(verbose=True)`` and ``wsi-ssl info``.
        overwrite: replace an existing registration instead of raising.
        embed_dim: the feature length ``D`` when known: ``embed_slides`` then never calls
            ``builder`` in the driver process (otherwise it builds it once on the meta device,
            without memory for weights, to read ``D``).
    """
    def _register(fn: Callable[[], Any]) -> Callable[[], Any]:
        if not callable(fn):
            raise ConfigError(f"register_encoder({name!r}, builder=...) needs a callable; got "
                              f"{type(fn).__name__}.")
        if name in _REGISTRY and not overwrite:
            raise ConfigError(f"an encoder named {name!r} is already registered; pass "
                              "overwrite=True to replace it.")
        if embed_dim is not None and (isinstance(embed_dim, bool) or not isinstance(embed_dim, int)
                                      or embed_dim < 1):
            raise ConfigError(f"register_encoder({name!r}, embed_dim={embed_dim!r}): embed_dim "
                              "must be a positive integer (or None).")
        _REGISTRY[name] = EncoderEntry(name, fn, int(input_size), tuple(mean), tuple(std),
                                       description, embed_dim)
        return fn

    if builder is None:
        return _register
    _register(builder)
    return builder


_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def has_builtin_weights(name: str | os.PathLike) -> bool:
    """Whether ``create_encoder(name)`` without ``weights=`` has meaningful weights: a
    registered builder (its own weights, e.g. the bundled tiny encoders), a preset (weights
    from the local Hugging Face cache; none there is an error) or a ``.safetensors``
    checkpoint; ``False`` for a timm architecture (a random initialisation)."""
    name = str(name)
    return (name in _REGISTRY or get_preset(name) is not None
            or name.endswith(".safetensors"))


def weights_kind(spec: Mapping[str, Any] | None) -> str:
    """Where the weights of the encoder that ``spec`` builds come from, as recorded in a store
    (``encoder.weights``): ``"file"`` (a weights file), ``"random"`` (a random
    initialisation: ``random_weights=True`` or a timm name without weights), ``"builtin"`` (a
    registered builder) or ``"module"`` (a wrapped ``nn.Module``, ``spec=None``)."""
    if spec is None:
        return "module"
    if spec.get("random_weights"):
        return "random"
    if spec.get("weights"):
        return "file"
    return "builtin" if has_builtin_weights(str(spec["name"])) else "random"


def warn_random_weights(name: str, *, stacklevel: int = 3) -> None:
    """Warn once per process that ``name`` is built with a random initialisation."""
    with _WARNED_LOCK:
        if name in _WARNED:
            return
        _WARNED.add(name)
    warnings.warn(f"encoder {name!r} has no built-in weights and no weights= were given: it is a "
                  "random initialisation, so its features carry no pretrained meaning; pass "
                  "weights=FILE, or random_weights=True if this is on purpose.",
                  RandomWeightsWarning, stacklevel=stacklevel)


def describe_encoder(name: str) -> str:
    """The registered description of ``name`` ('' for timm names)."""
    preset = get_preset(name)
    if preset is not None:
        return (f"{preset.hub_repo}: {preset.arch}, {preset.embed_dim}-d ({preset.output}), "
                f"{preset.tile_size} px at {preset.mpp} µm/px, {preset.license}")
    entry = _REGISTRY.get(name)
    return entry.description if entry else ""


def _unknown(name: str) -> ConfigError:
    import timm  # lazy: a heavy import, only for timm names


    pool = list(_BY_NAME) + list(_REGISTRY) + timm.list_models()
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.6)
    hint = f" Closest: {close}." if close else ""
    return ConfigError(f"unknown encoder {name!r}: not registered (list_encoders()) and not a timm "
                       f"architecture.{hint}")


def _build(name: str) -> tuple[Any, dict[str, Any]]:
    """(module, info) for a registered or timm name, initialised under a fixed seed."""
    entry = _REGISTRY.get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        if entry is not None:
            model = entry.builder()
            info = {"input_size": entry.input_size, "mean": entry.mean, "std": entry.std,
                    "arch": {"registry": name}}
        else:
            import timm  # lazy: a heavy import, only for timm names

            if not timm.is_model(name):
                raise _unknown(name)
            model = timm.create_model(name, pretrained=False, num_classes=0)
            cfg = dict(getattr(model, "pretrained_cfg", None) or {})
            size = cfg.get("input_size", (3, 224, 224))
            info = {"input_size": int(size[-1]), "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
                    "std": tuple(cfg.get("std", IMAGENET_STD)), "arch": {"timm": name}}
    return model, info


def _embed_dim(model: Any, input_size: int) -> int:
    for attr in ("head_hidden_size", "num_features", "embed_dim", "out_features"):
        v = getattr(model, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    was = model.training
    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, input_size, input_size))
    model.train(was)
    if out.ndim != 2:
        raise ConfigError(f"the module returns shape {tuple(out.shape)} for one tile; an encoder "
                          "must return (B, D) features.")
    return int(out.shape[1])


def create_encoder(name: Any, *, weights: str | os.PathLike | None = None,
                   device: str = "auto", dtype: str = "auto", input_size: int | None = None,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   embed_dim: int | None = None, random_weights: bool = False,
                   model_kwargs: Mapping[str, Any] | None = None):
    """Build a :class:`TileEncoder`.

    Args:
        name: a foundation-model preset (``"uni"``, ``"virchow2"``, ... or a TRIDENT alias such
            as ``"uni_v1"``), a registered name (``list_encoders()``), any timm architecture
            name, a ``.safetensors`` checkpoint written by our tile pretraining (its metadata
            names the architecture), or an ``nn.Module`` to wrap (it must map ``(B, 3, S, S)``
            to ``(B, D)``).
        weights: a local ``.safetensors`` or torch state-dict file (loaded with
            ``weights_only=True``). For a preset also a folder holding the hub files (what
            ``huggingface-cli download REPO --local-dir DIR`` writes), and ``None`` looks the
            preset's hub repo up in the local Hugging Face cache (offline). For other names
            ``None`` keeps the deterministic random initialisation (for a timm name, which has
            no built-in weights, with a :class:`~wsi_ssl.errors.RandomWeightsWarning`, once
            per process per name).
        random_weights: build with a deterministic random initialisation on purpose (tests,
            architecture checks; the features mean nothing): a preset loads no weights, a timm
            name is built without the warning (a registered name is unchanged).
        model_kwargs: presets only: architecture keyword arguments that replace the preset's
            (e.g. ``{"depth": 1}`` for a fast test instance); recorded in the fingerprint.
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``"auto"`` (float32 on the CPU, bfloat16/float16 autocast on CUDA), ``"float32"``,
            ``"bfloat16"``, ``"float16"``.
        input_size, mean, std: override the preprocessing (default: the registry entry or the
            timm pretrained config).
        embed_dim: only for wrapped modules that do not expose ``num_features``/``embed_dim``
            (otherwise found with one dummy forward pass).

    Raises:
        ConfigError: unknown name (with the closest matches) or bad options.
        WeightsError: unreadable, missing or mismatched weights (the message names the file,
            the first offending keys, the likely cause and, for a preset, how to fetch them).
    """

    if isinstance(name, nn.Module):
        size = int(input_size or 224)
        dim = int(embed_dim or _embed_dim(name, size))
        cls = type(name)
        return TileEncoder(name, name=f"module:{cls.__qualname__}", embed_dim=dim, input_size=size,
                           mean=mean or IMAGENET_MEAN, std=std or IMAGENET_STD, device=device,
                           dtype=dtype, spec=None)
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError(f"create_encoder(name=...) takes a name, a checkpoint path or an "
                          f"nn.Module; got {type(name).__name__}.")
    name = str(name)
    preset = get_preset(name)
    if preset is not None:
        if input_size is not None or mean is not None or std is not None or embed_dim:
            raise ConfigError(f"{preset.name!r} is a preset with the published preprocessing; "
                              "input_size/mean/std/embed_dim cannot be changed.")
        return _create_preset(preset, weights=weights, device=device, dtype=dtype,
                              random_weights=random_weights, model_kwargs=model_kwargs)
    if model_kwargs:
        raise ConfigError(f"model_kwargs are for foundation-model presets "
                          f"({', '.join(list_presets_short())}); {name!r} is not one.")
    if random_weights and weights is not None:
        raise ConfigError("pass weights= or random_weights=True, not both.")
    spec = plain_spec(name, weights=weights, device=device, dtype=dtype, input_size=input_size,
                      mean=mean, std=std)
    name, weights, input_size = spec["name"], spec["weights"], spec["input_size"]
    if weights is None and not random_weights and not has_builtin_weights(name):
        warn_random_weights(name)
    model, info = _build(name)
    if weights is not None:
        load_weights_into(model, weights)
    size = int(input_size or info["input_size"])
    arch = dict(info["arch"])  # weights enter the fingerprint through their values, not name
    return TileEncoder(model, name=name, embed_dim=int(embed_dim or _embed_dim(model, size)),
                       input_size=size, mean=tuple(mean or info["mean"]),
                       std=tuple(std or info["std"]), device=device, dtype=dtype, spec=spec,
                       arch=arch)


def plain_spec(name: str, *, weights: str | os.PathLike | None, device: str, dtype: str,
               input_size: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None) -> dict[str, Any]:
    """The spec of a registered/timm name or a ``.safetensors`` checkpoint of our tile
    pretraining (its metadata names the architecture and the tile size), checked, unbuilt."""
    meta: dict[str, str] = {}
    if name.endswith(".safetensors") and weights is None:
        if not Path(name).is_file():
            raise WeightsError(f"checkpoint '{name}' does not exist.")
        meta = read_checkpoint_metadata(name)
        if "arch" not in meta:
            raise WeightsError(f"'{name}' has no 'arch' in its metadata; call "
                               "create_encoder(ARCH, weights=PATH) with the architecture name.")
        weights, name = name, meta["arch"]
    elif weights is not None:
        meta = read_checkpoint_metadata(weights)
        if meta.get("format") == CHECKPOINT_FORMAT and meta.get("arch") not in (None, name):
            raise WeightsError(f"weights '{weights}' were written for arch {meta['arch']!r}, "
                               f"not {name!r}; use create_encoder({meta['arch']!r}, weights=...).")
    if input_size is None and meta.get("format") == CHECKPOINT_FORMAT and meta.get("tile_size"):
        input_size = int(meta["tile_size"])  # our tile-SSL weights: the size they were trained at
    if name not in _REGISTRY:
        import timm  # lazy: a heavy import, only for timm names

        if not timm.is_model(name):
            raise _unknown(name)
    return {"name": name, "weights": None if weights is None else str(Path(weights).resolve()),
            "device": device, "dtype": dtype, "input_size": input_size, "mean": mean, "std": std}


def preset_spec(preset: Any, *, weights: Any, device: str, dtype: str, random_weights: bool,
                model_kwargs: Mapping[str, Any] | None) -> tuple[dict[str, Any], Path | None]:
    """(spec, weights file or None) of a preset, its weights located but not read."""
    overrides = dict(model_kwargs or {})
    if random_weights and weights is not None:
        raise ConfigError("pass weights= or random_weights=True, not both.")
    path = None if random_weights else resolve_weights(preset, weights)
    spec = {"name": preset.name, "weights": None if path is None else str(Path(path).absolute()),
            "device": device, "dtype": dtype, "random_weights": bool(random_weights),
            "model_kwargs": overrides or None}
    if not is_builtin(preset):  # travels to dask workers that never registered it
        spec["preset"] = preset.to_dict()
    return spec, path


def list_presets_short() -> list[str]:
    return list_presets()[:4] + ["..."]


def _create_preset(preset: Any, *, weights: Any, device: str, dtype: str, random_weights: bool,
                   model_kwargs: Mapping[str, Any] | None):
    """A preset's :class:`TileEncoder` (architecture on the meta device, weights assigned)."""
    spec, path = preset_spec(preset, weights=weights, device=device, dtype=dtype,
                             random_weights=random_weights, model_kwargs=model_kwargs)
    overrides = dict(model_kwargs or {})
    model = build_preset_model(preset, path, overrides=overrides, seed=INIT_SEED)
    logger.info("encoder %s: %s weights from %s", preset.name, preset.hub_repo,
                path if path is not None else "a random initialisation")
    arch = {"preset": preset.name, "arch": preset.arch, "kwargs": dict(preset.kwargs),
            "overrides": overrides, "output": preset.output}
    return TileEncoder(model, name=preset.name, embed_dim=preset.embed_dim,
                       input_size=preset.input_size, resize_size=preset.resize_size,
                       interpolation=preset.interpolation, mean=preset.mean, std=preset.std,
                       device=device, dtype=dtype, spec=spec, arch=arch, channels_last=False,
                       activation_bytes=activation_bytes(model, preset.input_size))


def encoder_from_spec(spec: dict[str, Any], fingerprint: str | None = None, *,
                      device: str | None = None):
    """Rebuild an encoder from ``TileEncoder.spec`` (in another process) and check that it is
    the same one (same fingerprint)."""
    kw = {k: spec.get(k) for k in ("weights", "input_size", "mean", "std")}
    # the process that made the spec decided about random weights (and warned): not again here
    kw["random_weights"] = spec.get("weights") is None
    if spec.get("preset") and get_preset(spec["name"]) is None:
        register_preset(preset_from_dict(spec["preset"]))
    if spec.get("random_weights") or spec.get("model_kwargs"):
        kw = {"weights": spec.get("weights"), "random_weights": bool(spec.get("random_weights")),
              "model_kwargs": spec.get("model_kwargs")}
    enc = create_encoder(spec["name"], device=device or spec.get("device", "auto"),
                         dtype=spec.get("dtype", "auto"), **kw)
    if fingerprint is not None and enc.fingerprint != fingerprint:
        raise EncoderMismatchError(
            f"encoder {spec['name']!r} rebuilt here has fingerprint {enc.fingerprint}, expected "
            f"{fingerprint}: the weights file '{spec.get('weights')}' differs on this machine, or "
            "the timm version differs; use the same files and versions everywhere.")
    return enc


def _register_builtins() -> None:
    register_encoder("tiny-cnn", _tiny.build_tiny_cnn, input_size=64, overwrite=True, embed_dim=64,
                     description="4-block CNN, 64-d, 64 px; random deterministic weights "
                     "(tests/demo)")
    register_encoder("tiny-vit", _tiny.build_tiny_vit, input_size=64, overwrite=True, embed_dim=64,
                     description="2-block ViT (timm), 64-d, 64 px; random deterministic weights "
                     "(tests/demo)")


_register_builtins()


SPEC_BUILDER[:] = [encoder_from_spec]  # encoders pickled by spec are rebuilt through here
