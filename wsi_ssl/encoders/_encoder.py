"""``TileEncoder``: a backbone plus its preprocessing, a device policy and a fingerprint.

Tiles go in as uint8 ``(B, H, W, 3)`` (numpy or torch, what the tiling stage yields) or as float
``(B, 3, H, W)`` in [0, 1] (already augmented); they are moved to the device as they are,
resized to ``input_size`` when needed and normalised *on the device* (on a GPU, normalising on
the CPU would cost as much as reading the tile). On CUDA the model runs under ``autocast``
(bfloat16 where supported, else float16) and ``inference_mode``, channels-last for CNNs; on the
CPU in float32, in micro-batches small enough for the activations of big models to fit in
memory, with a measured tiles/s estimate in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_ssl._utils import resolve_device
from wsi_ssl.errors import ConfigError, InputError

__all__ = ["TileEncoder", "model_fingerprint", "IMAGENET_MEAN", "IMAGENET_STD"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def model_fingerprint(arch: Mapping[str, Any], state_dict: Mapping[str, Any]) -> str:
    """A 16-hex-digit hash of an architecture description and every tensor of a state dict.

    Two encoders with the same fingerprint produce the same features for the same tiles; any
    change to the weights, the architecture or the preprocessing changes it.
    """
    h = hashlib.sha256()
    h.update(json.dumps(dict(arch), sort_keys=True, default=str).encode())
    for key in sorted(state_dict):
        t = state_dict[key]
        arr = t.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        # view as bytes: works for every dtype (bfloat16 included), no copy for contiguous tensors
        h.update(arr.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {_DTYPES}; use 'auto' (float32 on the "
                          "CPU, bfloat16/float16 autocast on CUDA).")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


class TileEncoder(nn.Module):
    """A tile backbone with its preprocessing.

    Attributes:
        model: the backbone, ``(B, 3, S, S)`` normalised float -> ``(B, D)`` features.
        name: registry/timm name or a description of a wrapped module.
        embed_dim: ``D``.
        input_size: ``S``, the edge (px) of what the model sees.
        resize_size: tiles are resized to this edge (px), then centre-cropped to ``S``.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (antialiased) for that resize.
        mean, std: per-channel normalisation (RGB, [0, 1] scale).
        fingerprint: 16 hex digits, hash of architecture + preprocessing + weights.
        device: where the model runs.
        dtype: compute dtype (float32 on the CPU; bfloat16/float16 autocast on CUDA).
        spec: how to rebuild this encoder in another process (``None`` for wrapped modules,
            which travel pickled).
        activation_bytes: estimated peak activation memory per tile on the CPU (``None``: not
            estimated, tiles are not split into micro-batches).
    """

    def __init__(self, model: nn.Module, *, name: str, embed_dim: int, input_size: int,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 device: str | torch.device = "auto", dtype: str = "auto",
                 spec: dict[str, Any] | None = None, arch: Mapping[str, Any] | None = None,
                 resize_size: int | None = None,
                 interpolation: Literal["bilinear", "bicubic"] = "bilinear",
                 channels_last: bool = True, activation_bytes: int | None = None) -> None:
        super().__init__()
        if int(input_size) <= 0:
            raise ConfigError(f"input_size={input_size!r} must be a positive number of pixels.")
        if resize_size is not None and int(resize_size) < int(input_size):
            raise ConfigError(f"resize_size={resize_size!r} must be >= input_size={input_size}.")
        if interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"interpolation={interpolation!r} must be 'bilinear' or 'bicubic'.")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"mean={tuple(mean)} / std={tuple(std)} must be 3 values each "
                              "(RGB), std > 0.")
        self.model = model
        self.name = str(name)
        self.embed_dim = int(embed_dim)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.resize_size = int(resize_size or input_size)
        self.interpolation = interpolation
        self.spec = spec
        self.activation_bytes = activation_bytes
        self._channels_last = bool(channels_last)
        self._rate_logged = False
        self._dtype_arg = dtype
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)
        arch_desc = dict(arch or {"class": type(model).__module__ + "." + type(model).__qualname__})
        arch_desc.update(input_size=self.input_size, mean=self.mean, std=self.std,
                         embed_dim=self.embed_dim)
        if (self.resize_size, interpolation) != (self.input_size, "bilinear"):
            arch_desc.update(resize_size=self.resize_size, interpolation=interpolation)
        self.fingerprint = model_fingerprint(arch_desc, model.state_dict())
        self.eval()
        self.to_device(device, dtype)

    # -- device policy ---------------------------------------------------------------------
    def to_device(self, device: str | torch.device = "auto", dtype: str | None = None
                  ) -> TileEncoder:
        """Move to ``device`` (``"auto"`` picks CUDA when present) and set the compute dtype."""
        dev = resolve_device(device)
        self.device = dev
        self.dtype = _resolve_dtype(dtype or self._dtype_arg, dev)
        self.to(dev)
        if dev.type == "cuda" and self._channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, embed_dim={self.embed_dim}, input_size={self.input_size}, "
                f"fingerprint={self.fingerprint}, device={self.device}, dtype={self.dtype}")

    # -- compute ---------------------------------------------------------------------------
    def preprocess(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` or float ``(B, 3, H, W)`` in [0, 1] -> normalised float
        ``(B, 3, S, S)`` on the device.

        Shape:
            tiles: ``(B, H, W, 3)`` uint8 or ``(B, 3, H, W)`` float; returns ``(B, 3, S, S)``.
        """
        x = torch.from_numpy(np.ascontiguousarray(tiles)) if isinstance(tiles, np.ndarray) \
            else tiles
        if not isinstance(x, torch.Tensor):
            raise InputError(f"tiles must be a numpy array or torch tensor; got {type(tiles)}.")
        if x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise InputError(f"uint8 tiles must be (B, H, W, 3); got {tuple(x.shape)}.")
            x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        elif x.is_floating_point():
            if x.ndim != 4 or x.shape[1] != 3:
                raise InputError(f"float tiles must be (B, 3, H, W) in [0, 1]; got "
                                 f"{tuple(x.shape)}.")
            x = x.to(self.device, dtype=torch.float32, non_blocking=True)
        else:
            raise InputError(f"tiles must be uint8 (B, H, W, 3) or float (B, 3, H, W); got "
                             f"dtype {x.dtype}.")
        r, s = self.resize_size, self.input_size
        if x.shape[-2:] != (r, r):
            x = F.interpolate(x, size=(r, r), mode=self.interpolation, align_corners=False,
                              antialias=True)
            if self.interpolation == "bicubic":
                x = x.clamp_(0.0, 1.0)  # bicubic overshoots; PIL/torchvision clamp too
        if r != s:
            top = (r - s) // 2
            x = x[..., top:top + s, top:top + s]
        x = (x - self._mean) / self._std
        if self.device.type == "cuda" and self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features of float tiles in [0, 1] (differentiable; for fine-tuning).

        Shape:
            x: ``(B, 3, H, W)`` float in [0, 1]; returns ``(B, D)``.
        """
        return self.model(self.preprocess(x))

    def embed(self, tiles: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Inference features, float32 on the CPU.

        Shape:
            tiles: ``(B, H, W, 3)`` uint8 or ``(B, 3, H, W)`` float in [0, 1];
            returns ``(B, D)`` float32.
        """
        if len(tiles) == 0:
            return torch.zeros((0, self.embed_dim), dtype=torch.float32)
        step = self.micro_batch(len(tiles))
        t0 = time.perf_counter()
        outs = []
        with torch.inference_mode():
            for i in range(0, len(tiles), step):
                x = self.preprocess(tiles[i:i + step])
                use_amp = self.dtype != torch.float32
                with torch.autocast(self.device.type, dtype=self.dtype, enabled=use_amp):
                    out = self.model(x)
                outs.append(out.float())
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        if self.device.type == "cpu" and self.activation_bytes and not self._rate_logged:
            self._rate_logged = True
            rate = len(tiles) / max(time.perf_counter() - t0, 1e-9)
            logger.info("%s on the CPU: %.2f tiles/s measured on %d tiles (micro-batches of %d, "
                        "~%.0f MiB of activations each): about %.0f min per 10,000 tiles; a GPU "
                        "is much faster.", self.name, rate, len(tiles), step,
                        step * self.activation_bytes / 2**20, 10_000 / rate / 60)
        if out.ndim != 2 or out.shape[1] != self.embed_dim:
            raise InputError(f"encoder {self.name!r} returned shape {tuple(out.shape)}, "
                             f"expected (B, {self.embed_dim}); wrap a module that pools to "
                             "(B, D).")
        return out.cpu()

    def micro_batch(self, n: int) -> int:
        """How many of ``n`` tiles go through the model at once: all on a GPU or for small
        models; on the CPU as many as keep the estimated activations under a quarter of the
        available memory."""
        if self.device.type != "cpu" or not self.activation_bytes:
            return max(1, n)
        try:
            import psutil  # lazy: optional, only to size batches on the CPU

            budget = psutil.virtual_memory().available // 4
        except ImportError:  # pragma: no cover - psutil comes with dask.distributed
            budget = 2 * 2**30
        return max(1, min(n, int(budget // self.activation_bytes)))

    def __reduce_ex__(self, protocol: int):
        # Encoders built by create_encoder travel as their spec (rebuilt, same fingerprint, on
        # the receiving side's own device: a dask worker uses its own GPU); wrapped modules
        # travel as the default pickle.
        if self.spec is not None:
            return (_rebuild_from_spec, (self.spec, self.fingerprint))
        return super().__reduce_ex__(protocol)


#: ``encoder_from_spec`` of the registry, which fills this in when it is imported (importing
#: this module imports the ``wsi_ssl.encoders`` package first, so unpickling always finds it).
SPEC_BUILDER: list[Any] = []


def _rebuild_from_spec(spec: dict[str, Any], fingerprint: str):
    return SPEC_BUILDER[0](spec, fingerprint)


