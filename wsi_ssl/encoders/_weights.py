"""Loading local weight files into a backbone: safetensors or torch state dicts (``weights_only``).

Never a download. Prefixes ``module.`` (DataParallel), ``backbone.`` (our tile pretraining and
many SSL repos) and ``model.``/``encoder.`` are stripped when that makes the keys match; classifier
heads in the file are ignored (backbones are built with ``num_classes=0``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_ssl.errors import WeightsError

__all__ = ["read_weights", "load_weights_into", "read_checkpoint_metadata", "CHECKPOINT_FORMAT"]

#: ``format`` metadata of the safetensors files written by our tile pretraining.
CHECKPOINT_FORMAT = "wsi-ssl-tile-encoder"

_PREFIXES = ("module.", "backbone.", "model.", "encoder.", "_orig_mod.")
_HEAD_NAMES = ("fc.", "head.", "classifier.", "heads.", "head_dist.", "last_linear.")


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata dict of a ``.safetensors`` file (``{}`` for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any parse error of a foreign file
        raise WeightsError(f"cannot read weights file '{path}': {err}") from err


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch file loaded with
    ``weights_only=True`` (unwrapping ``state_dict`` / ``model`` / ``teacher`` entries)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; pass a local .safetensors or "
                           ".pth file (no downloads).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise WeightsError(f"cannot read weights file '{path}': {err}. Use a safetensors file or "
                           "a plain torch state dict (loaded with weights_only=True).") from err
    for key in ("state_dict", "model", "teacher", "student", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"'{path}' does not hold a state dict of tensors (got "
                           f"{type(sd).__name__}); save model.state_dict().")
    return dict(sd)


def _strip(sd: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Strip known prefixes from each key (repeatedly) until it matches an expected key."""
    out = {}
    for key, value in sd.items():
        k = key
        while k not in expected:
            p = next((p for p in _PREFIXES if k.startswith(p)), None)
            if p is None:
                break
            k = k[len(p):]
        out[k if k in expected else key] = value
    return out


def _bare(key: str) -> str:
    while True:
        p = next((p for p in _PREFIXES if key.startswith(p)), None)
        if p is None:
            return key
        key = key[len(p):]


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file into ``model`` strictly (except classifier heads).

    Raises:
        WeightsError: unreadable file, missing keys, unexpected keys or shape mismatches (the
            message lists a few of each).
    """
    sd = read_weights(path)
    own = model.state_dict()
    sd = _strip(sd, set(own))
    unexpected = [k for k in sd if k not in own and not _bare(k).startswith(_HEAD_NAMES)]
    missing = [k for k in own if k not in sd]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise WeightsError(f"weights '{path}' do not match the architecture: " + "; ".join(parts)
                           + ". Check the encoder name matches the architecture the weights "
                           "were trained with.")
    model.load_state_dict({k: sd[k] for k in own}, strict=True)


def metadata_json(meta: dict[str, str], key: str) -> Any:
    """Decode a JSON-valued metadata entry, or return the raw string."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw
