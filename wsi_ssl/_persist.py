"""One persistence format for every fitted estimator (``MILClassifier``, ``SlideSSL``): a
directory with ``model.safetensors`` (the tensors; no pickle) and ``config.json`` (format name,
format version, package version, the constructor parameters and the fitted state), both written
atomically.

    save_estimator(path, format="wsi-ssl-mil-classifier", params=..., tensors=..., state=...)
    cfg, tensors = load_estimator(path, format="wsi-ssl-mil-classifier", owner="MILClassifier",
                                  hint="write one with MILClassifier.save()")

A directory of another format, of a newer format version, or with unreadable files is refused
with one :class:`~wsi_ssl.errors.WeightsError` naming the directory and what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl._version import __version__
from wsi_ssl.errors import ConfigError, WeightsError

__all__ = ["MODEL_FILE", "CONFIG_FILE", "save_estimator", "load_estimator"]

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_estimator(path: str | os.PathLike, *, format: str, format_version: int = 1,
                   params: Mapping[str, Any], tensors: Mapping[str, Any],
                   state: Mapping[str, Any]) -> Path:
    """Write ``tensors`` (torch tensors) and ``config.json`` = format, version, ``params`` and
    ``state`` (JSON-serialisable) into directory ``path``; returns ``path``."""
    from safetensors.torch import save as to_bytes  # lazy: torch, only when saving

    path = Path(path)
    cfg = {"format": format, "format_version": int(format_version), "version": __version__,
           "params": dict(params), **dict(state)}
    try:
        text = json.dumps(cfg, indent=2)
    except TypeError as err:
        raise ConfigError(f"cannot save to '{path}': a parameter or fitted value is not JSON "
                          f"serialisable ({err}); use plain numbers and strings.") from err
    path.mkdir(parents=True, exist_ok=True)
    blob = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path / MODEL_FILE, to_bytes(blob, metadata={"format": format}))
    atomic_write_bytes(path / CONFIG_FILE, text.encode())
    return path


def load_estimator(path: str | os.PathLike, *, format: str, owner: str, hint: str,
                   format_version: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a directory written by :func:`save_estimator`: ``(config, tensors)``.

    Raises:
        WeightsError: missing files, another format, a newer format version, unreadable files.
    """
    from safetensors.torch import load_file  # lazy: torch, only when loading

    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / MODEL_FILE).is_file():
        raise WeightsError(f"'{path}' is not a {owner} directory (needs {CONFIG_FILE} and "
                           f"{MODEL_FILE}); {hint}.")
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"cannot read '{path / CONFIG_FILE}' ({err}); {hint}.") from err
    if not isinstance(cfg, dict) or cfg.get("format") != format:
        got = cfg.get("format") if isinstance(cfg, dict) else None
        raise WeightsError(f"'{path}' holds format {got!r}, not a {owner} ({format!r}); {hint}.")
    version = int(cfg.get("format_version", 1))
    if version > format_version:
        raise WeightsError(f"'{path}' was written by a newer wsi-ssl ({owner} format version "
                           f"{version}, this one reads up to {format_version}); upgrade wsi-ssl.")
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise WeightsError(f"cannot read '{path / MODEL_FILE}' ({err}); {hint}.") from err
    return cfg, tensors
