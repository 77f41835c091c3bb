"""Training machinery of slide SSL: optimiser with weight decay, warm-up + cosine schedule,
checkpoints (safetensors only, never pickle) and the loss-curve picture."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_ssl.errors import CheckpointError, ConfigError

__all__ = ["validate_params", "build_optimizer", "lr_factor", "save_checkpoint", "load_checkpoint",
           "plot_loss_curve", "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "checkpoint.safetensors"
_FORMAT = "wsi-ssl-slide-ssl-checkpoint"


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float,
                    optimizer: str = "adamw") -> torch.optim.Optimizer:
    """Adam/AdamW with ``weight_decay`` on the weight matrices and none on biases/norms.

    (The reference Giga-SSL code builds its optimiser without the weight decay of its config; here
    it reaches the optimiser: ``param_groups[0]["weight_decay"] == weight_decay``.)
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 then cosine decay to ``final_ratio`` (a multiplier of the base lr)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / rest)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim.{pid}.{key}"] = val.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, val in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = val
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer,
                    info: dict[str, Any]) -> Path:
    """Write model + optimiser tensors and ``info`` (JSON in the metadata) to one safetensors file,
    atomically (temporary sibling + ``os.replace``), so a kill never leaves half a checkpoint."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().clone().contiguous()
               for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    tensors.update(opt_tensors)
    meta = {"format": _FORMAT, "info": json.dumps(info), "optim": json.dumps(opt_meta)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer
                    ) -> dict[str, Any]:
    """Restore ``model`` and ``opt`` in place from :func:`save_checkpoint`; return its ``info``."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise CheckpointError(f"'{path}' is not a slide-SSL checkpoint "
                                      f"(format={meta.get('format')!r}).")
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        info = json.loads(meta["info"])
        opt_meta = json.loads(meta["optim"])
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read checkpoint '{path}': {err}; delete it to start "
                              "over.") from err
    model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_t = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    try:
        model.load_state_dict(model_sd, strict=True)
        opt.load_state_dict(_unflatten_optimizer(opt_t, opt_meta))
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(f"checkpoint '{path}' does not fit this model: {err}") from err
    return info


def plot_loss_curve(history: list[float], path: str | os.PathLike, *,
                    title: str = "slide SSL (NT-Xent)") -> Path:
    """A PNG of the per-epoch mean loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ep = np.arange(1, len(history) + 1)
    ax.plot(ep, history, lw=1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def validate_params(m: Any) -> None:
    """Check the parameters of a SlideSSL (ConfigError naming the bad one)."""
    from wsi_ssl.pretrain._slide_data import CoordAugment

    def pos_int(name: str, minimum: int = 1) -> None:
        v = getattr(m, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
            raise ConfigError(f"SlideSSL {name}={v!r} must be an integer >= {minimum}.")

    for name in ("embed_dim", "tiles_per_view", "batch_size", "epochs", "inference_batch",
                 "checkpoint_every"):
        pos_int(name)
    pos_int("warmup_epochs", 0)
    pos_int("batch_size", 2)
    if m.inference_chunks is not None:
        pos_int("inference_chunks")
    for name in ("temperature", "lr"):
        v = getattr(m, name)
        if not isinstance(v, (int, float)) or not v > 0:
            raise ConfigError(f"SlideSSL {name}={v!r} must be a number > 0.")
    if not isinstance(m.weight_decay, (int, float)) or m.weight_decay < 0:
        raise ConfigError(f"SlideSSL weight_decay={m.weight_decay!r} must be >= 0.")
    if m.optimizer not in ("adamw", "adam"):
        raise ConfigError(f"SlideSSL optimizer={m.optimizer!r}; use 'adamw' or 'adam'.")
    dims = tuple(m.proj_dims)
    if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims):
        raise ConfigError(f"SlideSSL proj_dims={m.proj_dims!r} must be positive integers, "
                          "e.g. (512, 512, 256).")
    if m.coord_augment is not None and not isinstance(m.coord_augment, CoordAugment):
        raise ConfigError("SlideSSL coord_augment must be a CoordAugment or None; got "
                          f"{type(m.coord_augment).__name__}.")
