"""An encoder's identity without building it: name, fingerprint, ``embed_dim``, input size.

``embed_slides`` runs in a driver process that never needs the model (a ViT-g is 4.5 GB): the
workers build it. The driver still has to bind the store to the encoder (refusing another one)
and hash the embedding settings, so it takes the encoder's *spec fingerprint*: a hash of its spec
(name, preprocessing, architecture overrides, the preset's description) and of the weights
file's bytes (SHA-256 streamed in 8 MiB blocks, cached per process by path, size and mtime).
A worker computes the same hash from the spec it was sent and the file it sees, so a different
weights file on a worker is caught before it embeds anything.

Encoders without a weights file (registered builders, timm names, presets with
``random_weights=True``) are initialised under a fixed seed; their fingerprint then also records
the builder (or the timm version), which decide those weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_ssl.encoders._presets import get_preset, preset_from_dict
from wsi_ssl.encoders._registry import (
    _REGISTRY,
    INIT_SEED,
    _build,
    _embed_dim,
    plain_spec,
    preset_spec,
)
from wsi_ssl.errors import ConfigError, WeightsError

__all__ = ["EncoderIdentity", "encoder_identity", "spec_fingerprint", "file_sha256"]

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()
_BLOCK = 8 * 2**20


@dataclass(frozen=True, kw_only=True)
class EncoderIdentity:
    """What the embedding driver knows of an encoder without building it.

    Attributes:
        name: the encoder name (``TileEncoder.name``).
        fingerprint: 16 hex digits, :func:`spec_fingerprint` of ``spec``.
        embed_dim: feature length ``D``.
        input_size: edge (px) of what the model sees.
        spec: how a worker builds it (``TileEncoder.spec``, ``device`` left to the worker).
    """

    name: str
    fingerprint: str
    embed_dim: int
    input_size: int
    spec: dict[str, Any]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, streamed; cached per process by (path, size, mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), int(st.st_size), int(st.st_mtime_ns))
    with _SHA_LOCK:
        hit = _SHA_CACHE.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


def _builder_desc(name: str) -> dict[str, Any]:
    """What decides the weights of an encoder built without a weights file."""

    entry = _REGISTRY.get(name)
    if entry is not None:
        fn = entry.builder
        return {"registry": name, "builder": f"{getattr(fn, '__module__', '?')}."
                f"{getattr(fn, '__qualname__', type(fn).__name__)}", "init_seed": INIT_SEED,
                "input_size": entry.input_size, "mean": entry.mean, "std": entry.std}
    import timm  # lazy: timm only when an encoder is built

    return {"timm": name, "timm_version": timm.__version__, "init_seed": INIT_SEED}


def spec_fingerprint(spec: dict[str, Any]) -> str:
    """16 hex digits identifying the encoder that ``spec`` builds (see the module docstring).

    Args:
        spec: a ``TileEncoder.spec`` (``device`` / ``dtype`` do not enter: they change the
            arithmetic, not the model).

    Raises:
        WeightsError: the weights file named by the spec cannot be read.
    """

    blob = {k: v for k, v in spec.items() if k not in ("device", "dtype", "weights", "preset")}
    weights = spec.get("weights")
    if weights is not None:
        try:
            blob["weights_sha256"] = file_sha256(weights)
        except OSError as err:
            raise WeightsError(f"weights '{weights}' of encoder {spec.get('name')!r} cannot be "
                               f"read here ({err}); every process needs the same file at the "
                               "same path.") from err
    preset = (preset_from_dict(spec["preset"]) if spec.get("preset")
              else get_preset(str(spec["name"])))
    if preset is not None:
        blob["preset"] = preset.to_dict()
        if weights is None:
            import timm  # lazy: timm only when an encoder is built

            blob["timm_version"] = timm.__version__
    elif weights is None:
        blob["init"] = _builder_desc(str(spec["name"]))
    blob["scheme"] = "spec-v1"
    text = json.dumps(blob, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _dims_without_weights(name: str) -> tuple[int, dict[str, Any]]:
    """(embed_dim, build info) of a registered/timm name, built on the meta device (no memory
    for weights; a builder that cannot run there is built on the CPU)."""
    import torch  # lazy: torch takes ~1 s to import; only model code pays it


    try:
        with torch.device("meta"):
            model, info = _build(name)
            size = int(info["input_size"])
            return _embed_dim(model, size), info
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        model, info = _build(name)
        return _embed_dim(model, int(info["input_size"])), info


def encoder_identity(name: str | os.PathLike, *, weights: str | os.PathLike | None = None,
                     dtype: str = "auto", random_weights: bool = False,
                     model_kwargs: dict[str, Any] | None = None) -> EncoderIdentity:
    """Name, spec fingerprint, ``embed_dim`` and input size of ``create_encoder(name, ...)``
    without loading its weights (presets and encoders registered with ``embed_dim``: nothing is
    built; other registered/timm names: built on the meta device only to read ``embed_dim``).

    Args:
        name, weights, dtype, random_weights, model_kwargs: as for
            :func:`~wsi_ssl.encoders.create_encoder`.

    Raises:
        ConfigError: unknown name; WeightsError: missing or unreadable weights.
    """

    name = str(name)
    preset = get_preset(name)
    if preset is not None:
        spec, _ = preset_spec(preset, weights=weights, device="auto", dtype=dtype,
                              random_weights=random_weights, model_kwargs=model_kwargs)
        return EncoderIdentity(name=preset.name, fingerprint=spec_fingerprint(spec),
                               embed_dim=preset.embed_dim, input_size=preset.input_size,
                               spec=spec)
    if model_kwargs:
        raise ConfigError(f"model_kwargs are for foundation-model presets; {name!r} is not one.")
    if random_weights and weights is not None:
        raise ConfigError("pass weights= or random_weights=True, not both.")

    spec = plain_spec(name, weights=weights, device="auto", dtype=dtype)
    entry = _REGISTRY.get(spec["name"])
    if entry is not None and entry.embed_dim is not None:  # nothing to build
        dim, info = entry.embed_dim, {"input_size": entry.input_size}
    else:
        dim, info = _dims_without_weights(spec["name"])
    return EncoderIdentity(name=spec["name"], fingerprint=spec_fingerprint(spec), embed_dim=dim,
                           input_size=int(spec["input_size"] or info["input_size"]), spec=spec)
