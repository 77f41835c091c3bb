"""The one checkpoint format of ``wsi_ssl.pretrain``: safetensors + JSON metadata, never pickle.

A checkpoint file holds tensors (model weights, optimiser moments, RNG states) and, in its
safetensors metadata, ``format`` (what wrote it) and ``info`` (JSON: epoch, losses, config,
scheduler and every non-tensor piece of state). Files are written atomically (a temporary sibling,
fsync, ``os.replace``), so a killed run never leaves half a checkpoint.

Used by slide SSL (one ``checkpoint.safetensors`` in ``checkpoint_dir``) and by tile SSL, whose
layout next to the output weights ``ENCODER.safetensors`` is::

    ENCODER.ckpt/
      epoch-0003/
        method.safetensors   every weight of the method (backbone, heads, BYOL teacher)
        state.safetensors    optimiser, RNG states (tensors) + scheduler, AMP scaler, epoch,
                             losses, config (JSON metadata)

An epoch directory is written under a temporary name and renamed when complete; the newest
complete ``epoch-*`` directory is the one resumed.
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
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from wsi_ssl._utils import atomic_write_bytes
from wsi_ssl.encoders import CHECKPOINT_FORMAT
from wsi_ssl.errors import CheckpointError

__all__ = ["save_state", "load_state", "save_safetensors_atomic", "optimizer_tensors", "restore_optimizer",
           "save_checkpoint", "latest_checkpoint", "load_checkpoint", "clear_checkpoints",
           "save_encoder_weights", "ENCODER_FORMAT"]

logger = logging.getLogger(__name__)

#: ``format`` metadata of the tile-encoder weights (see docs/architecture.md).
ENCODER_FORMAT = CHECKPOINT_FORMAT  # the reader (create_encoder(weights=)) owns the name
_TILE_STATE_FORMAT = "wsi-ssl-tile-ssl-state"

_EPOCH_DIR = re.compile(r"^epoch-(\d{4,})$")


# -- the format ------------------------------------------------------------------------------------
def _tensors(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v.detach().to("cpu").clone().contiguous()
            for k, v in module.state_dict().items()}


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict[str, str]) -> None:
    """A safetensors file written with the package's one atomic writer
    (:func:`wsi_ssl._utils.atomic_write_bytes`: temporary sibling, fsync, ``os.replace``)."""
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict[str, Any],
               *, fmt: str) -> Path:
    """Write ``tensors`` and ``info`` (JSON in the metadata, key ``info``) atomically to ``path``.

    Args:
        path: the ``.safetensors`` file.
        tensors: name -> tensor (moved to the CPU, made contiguous).
        info: JSON-serialisable state.
        fmt: the ``format`` metadata :func:`load_state` checks.
    """
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_safetensors_atomic(cpu, path, {"format": fmt, "info": json.dumps(info)})
    return path


def load_state(path: str | os.PathLike, *, fmt: str) -> tuple[dict[str, torch.Tensor],
                                                               dict[str, Any]]:
    """Read a file of :func:`save_state`: ``(tensors, info)``.

    Raises:
        CheckpointError: unreadable, or written with another ``format``.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != fmt:
                raise CheckpointError(f"'{path}' is not a {fmt} checkpoint "
                                      f"(format={meta.get('format')!r}); delete it to start over.")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (no __iter__)
        info = json.loads(meta["info"])
        for key, val in meta.items():  # older slide checkpoints: "optim" next to "info"
            if key not in ("format", "info"):
                info.setdefault(key, json.loads(val))
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors and json fail in many ways
        raise CheckpointError(f"cannot read checkpoint '{path}': {err}; delete it to start "
                              "over.") from err
    return tensors, info


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optim."
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state dict split into tensors and a JSON-serialisable remainder."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any], prefix: str = "optim.") -> None:
    """Inverse of :func:`optimizer_tensors` (``tensors`` may hold other entries)."""
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        if name.startswith(prefix):
            pid, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(pid), {})[key] = val
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# -- tile-encoder weights ---------------------------------------------------------------------------
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
    save_safetensors_atomic(_tensors(backbone), path, meta)
    return path


# -- tile-SSL epoch directories ---------------------------------------------------------------------
def save_checkpoint(ckpt_dir: Path, epoch: int, method: nn.Module,
                    tensors: dict[str, torch.Tensor], info: dict[str, Any], *,
                    keep: int = 2) -> Path:
    """Write ``ckpt_dir/epoch-{epoch:04d}`` (method weights + ``tensors``/``info`` state)
    atomically and keep only the ``keep`` newest."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".epoch-{epoch:04d}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_safetensors_atomic(_tensors(method), tmp / "method.safetensors", {"epoch": str(epoch)})
    save_state(tmp / "state.safetensors", tensors, info, fmt=_TILE_STATE_FORMAT)
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
            if m and (p / "method.safetensors").is_file() and (
                    (p / "state.safetensors").is_file() or (p / "state.pt").is_file()):
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


def load_checkpoint(path: Path, method: nn.Module) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, Any]]:
    """Load the method weights in place; return the state's ``(tensors, info)``."""
    if not (path / "state.safetensors").is_file():
        raise CheckpointError(
            f"checkpoint '{path}' was written by an older wsi-ssl (pickled state.pt, no longer "
            "read); pass resume=False (--no-resume) to start over, or delete it.")
    try:
        weights = load_file(str(path / "method.safetensors"), device="cpu")
    except Exception as err:  # noqa: BLE001 - corrupt files fail in many ways
        raise CheckpointError(
            f"checkpoint '{path}' cannot be read ({err}); delete it or pass resume=False."
        ) from err
    tensors, info = load_state(path / "state.safetensors", fmt=_TILE_STATE_FORMAT)
    try:
        method.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint '{path}' does not match this model ({str(err).splitlines()[0]}); use "
            "the same arch/method/head sizes, another out= path, or resume=False."
        ) from err
    return tensors, info
