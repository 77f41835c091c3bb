"""Atomic training checkpoints for tile SSL.

Layout next to the output weights ``ENCODER.safetensors``::

    ENCODER.ckpt/
      epoch-0003/
        method.safetensors   every weight of the method (backbone, heads, BYOL teacher)
        state.pt             optimiser, scheduler, AMP scaler, RNG states, epoch, losses, config

An epoch directory is written under a temporary name and renamed when complete, so a killed run
never leaves a half checkpoint; the newest complete ``epoch-*`` directory is the one resumed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsi_ssl.errors import CheckpointError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "save_encoder_weights",
           "ENCODER_FORMAT"]

logger = logging.getLogger(__name__)

#: ``format`` metadata of the tile-encoder weights (see docs/architecture.md).
ENCODER_FORMAT = "wsi-ssl-tile-encoder"

_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def _atomic_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_encoder_weights(backbone: nn.Module, path: str | os.PathLike, *, arch: str,
                         extra: dict[str, Any] | None = None) -> Path:
    """Write the backbone's state dict as a tile-encoder ``.safetensors`` file, atomically.

    Metadata: ``format`` = ``"wsi-ssl-tile-encoder"``, ``arch`` and every ``extra`` entry (JSON
    encoded when not a string). ``create_encoder(arch, weights=path)`` loads it.
    """
    meta = {"format": ENCODER_FORMAT, "arch": str(arch)}
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, default=str)
    path = Path(path)
    _atomic_safetensors(_tensors(backbone), path, meta)
    return path


def save_checkpoint(ckpt_dir: Path, epoch: int, method: nn.Module, state: dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write ``ckpt_dir/epoch-{epoch:04d}`` atomically and keep only the ``keep`` newest."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".epoch-{epoch:04d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    from safetensors.torch import save_file

    save_file(_tensors(method), str(tmp / "method.safetensors"), metadata={"epoch": str(epoch)})
    with open(tmp / "state.pt", "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    done = sorted(_complete(ckpt_dir))
    for _, old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _EPOCH_DIR.match(p.name)
            if m and (p / "state.pt").is_file() and (p / "method.safetensors").is_file():
                out.append((int(m.group(1)), p))
    return out


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete epoch directory, or ``None``."""
    done = sorted(_complete(ckpt_dir))
    return done[-1][1] if done else None


def clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove every epoch directory (a fresh start with ``resume=False``)."""
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and (_EPOCH_DIR.match(p.name) or p.name.startswith(".epoch-")):
                shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, method: nn.Module) -> dict[str, Any]:
    """Load the method weights in place and return the ``state`` dict."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path / "method.safetensors"), device="cpu")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({err}); delete it or pass resume=False."
        ) from err
    try:
        method.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint '{path}' does not match this model ({str(err).splitlines()[0]}); use "
            "the same arch/method/head sizes, another out= path, or resume=False."
        ) from err
    return state
