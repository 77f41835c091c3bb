"""Loading local weight files into a backbone: safetensors or torch state dicts (``weights_only``).

Never a download. Prefixes ``module.`` (DataParallel), ``backbone.`` (our tile pretraining and
many SSL repos) and ``model.``/``encoder.`` are stripped when that makes the keys match; classifier
heads in the file are ignored (backbones are built with ``num_classes=0``).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_ssl.errors import WeightsError

__all__ = ["read_weights", "load_weights_into", "match_state_dict", "read_checkpoint_metadata",
           "CHECKPOINT_FORMAT"]

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
        from safetensors import safe_open  # lazy: safetensors only when weights are read

        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as err:  # noqa: BLE001 - any parse error of a foreign file
        raise WeightsError(f"cannot read weights file '{path}': {err}") from err


def _read_error(path: Path, err: Exception) -> WeightsError:
    """A one-line reason why ``path`` cannot be read, with the fix."""

    size = path.stat().st_size if path.exists() else 0
    if isinstance(err, pickle.UnpicklingError):
        why = ("it holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
               "and wsi-ssl loads tensors only (torch.load(weights_only=True)); in the "
               "environment that made it, save model.state_dict() (or a .safetensors file)")
    elif "central directory" in str(err) or "incomplete metadata" in str(err) or \
            "not fully covered" in str(err) or "unexpected EOF" in str(err):
        why = (f"the file looks truncated ({size:,} bytes; an interrupted download or copy?): "
               "fetch or copy it again")
    else:
        why = (f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}; use "
               "a .safetensors file or a plain torch state dict (loaded with weights_only=True)")
    return WeightsError(f"cannot read weights file '{path}': {why}.")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict from a ``.safetensors`` file or a torch file loaded with
    ``weights_only=True`` (memory-mapped when possible; unwrapping ``state_dict`` / ``model`` /
    ``teacher`` entries)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist; pass a local .safetensors or "
                           ".pth file (no downloads).")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file  # lazy: safetensors only when weights are read

            sd: Any = load_file(str(path), device="cpu")
        else:
            try:  # zip-format files map lazily: a 4 GB checkpoint is not read twice
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy format
    except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
        raise _read_error(path, err) from err
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


def match_state_dict(sd: dict[str, torch.Tensor], own: dict[str, Any], *,
                     ignore: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Align the keys of a weights file with a model's own keys (``own``: key -> tensor or
    shape): prefixes stripped, classifier heads and keys starting with ``ignore`` dropped.

    Returns:
        ``(state_dict, problems)``: the tensors to load, and a list of human-readable problem
        descriptions (empty when the file matches exactly).
    """
    sd = _strip(sd, set(own))
    skip = _HEAD_NAMES + tuple(ignore)
    unexpected = [k for k in sd if k not in own and not _bare(k).startswith(skip)]
    missing = [k for k in own if k not in sd]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(_shape(own[k]))}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(_shape(own[k]))]
    return {k: sd[k] for k in own if k in sd}, describe_key_problems(missing, unexpected, shapes)


def describe_key_problems(missing: list[str], unexpected: list[str],
                          shapes: list[str]) -> list[str]:
    """One human-readable line per kind of mismatch between a weights file and a model (empty
    when it matches): counts and the first few keys."""
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:4]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:4]})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
    return problems


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def load_weights_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a local weights file into ``model`` strictly (except classifier heads).

    Raises:
        WeightsError: unreadable file, missing keys, unexpected keys or shape mismatches (the
            message lists a few of each).
    """
    sd, problems = match_state_dict(read_weights(path), model.state_dict())
    if problems:
        raise WeightsError(f"weights '{path}' do not match the architecture: "
                           + "; ".join(problems) + ". Check the encoder name matches the "
                           "architecture the weights were trained with.")
    model.load_state_dict(sd, strict=True)


def metadata_json(meta: dict[str, str], key: str) -> Any:
    """Decode a JSON-valued metadata entry, or return the raw string."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw
