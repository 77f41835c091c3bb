"""Histology augmentations, one implementation for tile SSL and the slide-SSL view bank.

They live below both users (``wsi_ssl.tiling`` makes the view bank at embedding time,
``wsi_ssl.pretrain`` trains on random views), so that imports only point down the pipeline.

Two ways to use them:

* :func:`random_augment` draws **independent** parameters for every tile of a batch (tile-level
  SSL: two calls give the two views of SimCLR/BYOL).
* :func:`sample_params` draws **one** :class:`AugmentParams` and :func:`apply_params` applies it to
  every tile of a batch (the Giga-SSL shared augmentation: one view of a slide is all its tiles
  under the same transform).

The pipeline, in this fixed order: random resized crop (+ resize to ``out_size``), horizontal /
vertical flip, 90-degree rotation, HED stain jitter (Tellez et al. 2018; RGB -> optical density
-> haematoxylin/eosin/DAB with the Ruifrok & Johnston 2001 matrix -> per-stain scale and shift ->
back), brightness / contrast / saturation / hue jitter, grayscale, gaussian blur. Everything runs
batched on whatever device the tensor lives on (no per-tile Python loops), and is deterministic
for a given ``numpy.random.Generator`` state.

Example::

    rng = np.random.default_rng(0)
    va = random_augment(tiles, rng, "histo", out_size=224)   # (B, 3, 224, 224) float32 in [0, 1]
    vb = random_augment(tiles, rng, "histo", out_size=224)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wsi_ssl._validation import Interval, Pair, validate_params
from wsi_ssl.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch  # lazy: torch, only on tensors

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "get_augment_config",
    "sample_params",
    "apply_params",
    "random_augment",
    "PRESETS",
    "RGB_FROM_HED",
]

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB) in optical density,
#: as in scikit-image's ``rgb_from_hed``; rows are normalised to unit length before use.
RGB_FROM_HED: tuple[tuple[float, float, float], ...] = (
    (0.65, 0.70, 0.29),
    (0.07, 0.99, 0.11),
    (0.27, 0.57, 0.78),
)


_AUGMENT_RANGES: dict[str, list[Any]] = {
    "crop_scale": [Pair(Interval(float, 0, 1, closed="right"))],
    "crop_ratio": [Pair(Interval(float, 1e-3, 1e3))],
    "blur_sigma": [Pair(Interval(float, 0, 50))],
    "hed_scale": [Interval(float, 0, 1)],
    "hed_shift": [Interval(float, 0, 2)],
    "brightness": [Interval(float, 0, 1)],
    "contrast": [Interval(float, 0, 1)],
    "saturation": [Interval(float, 0, 1)],
    "hue": [Interval(float, 0, 0.5)],
}
_AUGMENT_PROBABILITIES = ("hflip", "vflip", "jitter_prob", "grayscale", "blur_prob")


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """What :func:`sample_params` may draw. Defaults are the ``"histo"`` preset.

    Attributes:
        crop_scale: area of the random crop as a fraction of the tile, ``(low, high)`` in (0, 1].
        crop_ratio: aspect ratio (w / h) range of the crop.
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip.
        rot90: draw a rotation by a random multiple of 90 degrees (histology has no "up").
        hed_scale: stain jitter: each of H, E, D concentrations is multiplied by
            ``U(1 - hed_scale, 1 + hed_scale)``.
        hed_shift: ... and shifted by ``U(-hed_shift, hed_shift)`` (optical-density units).
        jitter_prob: probability of applying the brightness/contrast/saturation/hue jitter.
        brightness: brightness factor drawn from ``U(1 - b, 1 + b)``.
        contrast: contrast factor drawn from ``U(1 - c, 1 + c)``.
        saturation: saturation factor drawn from ``U(1 - s, 1 + s)``.
        hue: hue rotation in turns drawn from ``U(-hue, hue)`` (at most 0.5).
        grayscale: probability of converting to grayscale (3 equal channels).
        blur_prob: probability of a gaussian blur.
        blur_sigma: blur sigma range in output pixels.
    """

    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.5
    rot90: bool = True
    hed_scale: float = 0.05
    hed_shift: float = 0.05
    jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.04
    grayscale: float = 0.05
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.5)

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        validate_params("AugmentConfig", values,
                        {name: [Interval(float, 0, 1)] for name in _AUGMENT_PROBABILITIES},
                        hint="It is a probability.")
        validate_params("AugmentConfig", values, _AUGMENT_RANGES)
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            object.__setattr__(self, name, tuple(float(v) for v in values[name]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for run configs written next to outputs)."""
        return dataclasses.asdict(self)


#: Named configurations for :func:`get_augment_config`.
PRESETS: dict[str, AugmentConfig] = {
    "histo": AugmentConfig(),
    "none": AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=False,
        hed_scale=0.0, hed_shift=0.0, jitter_prob=0.0, brightness=0.0, contrast=0.0,
        saturation=0.0, hue=0.0, grayscale=0.0, blur_prob=0.0,
    ),
}


def get_augment_config(
    cfg: Literal["histo", "none"] | str | AugmentConfig | dict[str, Any] | None = "histo",
) -> AugmentConfig:
    """A preset name (``"histo"``, ``"none"``), a dict of fields, or an :class:`AugmentConfig`."""
    if isinstance(cfg, AugmentConfig):
        return cfg
    if cfg is None:
        return PRESETS["none"]
    if isinstance(cfg, dict):
        known = {f.name for f in dataclasses.fields(AugmentConfig)}
        bad = sorted(set(cfg) - known)
        if bad:
            raise ConfigError(f"unknown AugmentConfig fields {bad}; known: {sorted(known)}.")
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    if isinstance(cfg, str) and cfg in PRESETS:
        return PRESETS[cfg]
    raise ConfigError(
        f"augment={cfg!r} is not a known augmentation preset; use one of {sorted(PRESETS)} "
        "or an AugmentConfig."
    )


@dataclass(frozen=True, kw_only=True)
class AugmentParams:
    """One draw of augmentation parameters; the default instance is the identity (resize only).

    Attributes:
        crop: ``(x0, y0, w, h)`` of the crop as fractions of the tile width / height.
        hflip, vflip: flip flags. rot90: number of 90-degree counter-clockwise turns (0-3).
        hed_scale, hed_shift: per-stain (H, E, D) multiplier and additive shift (optical density).
        brightness, contrast, saturation: multiplicative factors (1 = unchanged).
        hue: hue rotation in turns (0 = unchanged).
        grayscale: convert to grayscale. blur_sigma: gaussian sigma in output pixels (0 = none).
    """

    crop: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    hflip: bool = False
    vflip: bool = False
    rot90: int = 0
    hed_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hed_shift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0
    grayscale: bool = False
    blur_sigma: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_params(rng: np.random.Generator, cfg: str | AugmentConfig = "histo") -> AugmentParams:
    """Draw one :class:`AugmentParams` from ``cfg`` using ``rng`` (deterministic for a seed).

    The random resized crop follows torchvision's ``RandomResizedCrop``: area fraction from
    ``crop_scale``, log-uniform aspect ratio from ``crop_ratio``, up to 10 tries, else the whole tile.
    """
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}."
        )
    c = get_augment_config(cfg)
    crop = (0.0, 0.0, 1.0, 1.0)
    lo_r, hi_r = math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1])
    for _ in range(10):
        area = rng.uniform(*c.crop_scale)
        ratio = math.exp(rng.uniform(lo_r, hi_r))
        w, h = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if w <= 1.0 and h <= 1.0:
            crop = (float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h)), float(w), float(h))
            break
    jitter = rng.random() < c.jitter_prob
    u = rng.uniform(-1, 1, size=4)
    blur = rng.random() < c.blur_prob
    sigma = float(rng.uniform(*c.blur_sigma)) if blur else 0.0
    return AugmentParams(
        crop=crop,
        hflip=bool(rng.random() < c.hflip),
        vflip=bool(rng.random() < c.vflip),
        rot90=int(rng.integers(0, 4)) if c.rot90 else 0,
        hed_scale=tuple(float(v) for v in 1 + rng.uniform(-c.hed_scale, c.hed_scale, 3)),
        hed_shift=tuple(float(v) for v in rng.uniform(-c.hed_shift, c.hed_shift, 3)),
        brightness=float(1 + c.brightness * u[0]) if jitter else 1.0,
        contrast=float(1 + c.contrast * u[1]) if jitter else 1.0,
        saturation=float(1 + c.saturation * u[2]) if jitter else 1.0,
        hue=float(c.hue * u[3]) if jitter else 0.0,
        grayscale=bool(rng.random() < c.grayscale),
        blur_sigma=sigma,
    )


# --------------------------------------------------------------------------- tensor side


def _as_float_nchw(tiles: Any) -> torch.Tensor:
    import torch  # lazy: torch, only on tensors

    if isinstance(tiles, np.ndarray):
        tiles = torch.from_numpy(np.ascontiguousarray(tiles))
    if not isinstance(tiles, torch.Tensor):
        raise InputError(f"tiles must be a torch.Tensor or numpy array; got {type(tiles).__name__}.")
    if tiles.ndim != 4 or tiles.shape[1] != 3:
        hint = ""
        if tiles.ndim == 4 and tiles.shape[-1] == 3:
            hint = " (channels-last? use tiles.permute(0, 3, 1, 2))"
        raise InputError(f"tiles must be (B, 3, H, W); got shape {tuple(tiles.shape)}{hint}.")
    if tiles.dtype == torch.uint8:
        return tiles.float().div_(255.0)
    if not tiles.is_floating_point():
        raise InputError(f"tiles must be uint8 or float in [0, 1]; got dtype {tiles.dtype}.")
    return tiles.float()


def _stack(params: Sequence[AugmentParams], device: torch.device) -> dict[str, torch.Tensor]:
    import torch  # lazy: torch, only on tensors

    def t(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

    return {
        "crop": t("crop"), "hflip": t("hflip", torch.bool), "vflip": t("vflip", torch.bool),
        "rot90": t("rot90", torch.int64), "hed_scale": t("hed_scale"), "hed_shift": t("hed_shift"),
        "brightness": t("brightness"), "contrast": t("contrast"), "saturation": t("saturation"),
        "hue": t("hue"), "grayscale": t("grayscale", torch.bool), "blur_sigma": t("blur_sigma"),
    }


_LUMA = (0.299, 0.587, 0.114)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _hed_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    import torch  # lazy: torch, only on tensors

    m = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
    m = m / m.norm(dim=1, keepdim=True)
    rgb_from_hed = m.to(x)
    hed_from_rgb = torch.linalg.inv(m).to(x)
    # Beer-Lambert with a +1 offset so that pure black stays finite and the map is invertible.
    od = -torch.log((x * 255.0 + 1.0) / 256.0)
    hed = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    hed = hed * scale[:, :, None, None] + shift[:, :, None, None]
    od = torch.einsum("bdhw,dc->bchw", hed, rgb_from_hed)
    return ((torch.exp(-od) * 256.0 - 1.0) / 255.0).clamp_(0.0, 1.0)


def _hue_rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Hue rotation as a rotation of the chroma plane in YIQ (batched, differentiable)."""
    import torch  # lazy: torch, only on tensors

    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322],
                           [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq.double()).to(x)
    yiq = torch.einsum("bchw,dc->bdhw", x, to_yiq)
    a = turns * (2 * math.pi)
    cos, sin = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], cos * i - sin * q, sin * i + cos * q], 1)
    return torch.einsum("bdhw,cd->bchw", yiq, from_yiq).clamp_(0.0, 1.0)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-tile gaussian blur as one grouped separable convolution (sigma 0 = identity)."""
    import torch  # lazy: torch, only on tensors
    import torch.nn.functional as F  # lazy: torch

    smax = float(sigma.max())
    if smax <= 0:
        return x
    b, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * smax)), (min(h, w) - 1) // 2))
    pos = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.clamp_min(1e-6)[:, None]
    k = torch.exp(-0.5 * (pos[None] / s) ** 2)
    # truncate each kernel at its own 3 sigma so a tile's blur does not depend on its batch
    k = k * (pos[None].abs() <= torch.ceil(3 * s)).to(x.dtype)
    k = torch.where((sigma > 0)[:, None], k, (pos[None] == 0).to(x.dtype))
    k = k / k.sum(1, keepdim=True)
    k = k.repeat_interleave(c, 0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def _apply(x: torch.Tensor, p: dict[str, torch.Tensor], out_size: int) -> torch.Tensor:
    import torch  # lazy: torch, only on tensors
    from torchvision.ops import roi_align  # lazy: torchvision, only for crops

    b, _, h, w = x.shape
    crop = p["crop"]
    boxes = torch.stack([
        torch.arange(b, device=x.device, dtype=x.dtype),
        crop[:, 0] * w, crop[:, 1] * h,
        (crop[:, 0] + crop[:, 2]) * w, (crop[:, 1] + crop[:, 3]) * h,
    ], 1)
    # roi_align: bilinear sampling averaged over ceil(crop/out) points per output pixel, i.e.
    # an anti-aliased resized crop with a different box per tile, in one batched call.
    x = roi_align(x, boxes, output_size=(out_size, out_size), spatial_scale=1.0,
                  sampling_ratio=-1, aligned=True)
    x = torch.where(p["hflip"][:, None, None, None], x.flip(-1), x)
    x = torch.where(p["vflip"][:, None, None, None], x.flip(-2), x)
    k = p["rot90"]
    if bool((k != 0).any()):
        out = x.clone()
        for turn in (1, 2, 3):
            sel = k == turn
            if bool(sel.any()):
                out[sel] = torch.rot90(x[sel], turn, dims=(-2, -1))
        x = out
    if bool((p["hed_scale"] != 1).any() or (p["hed_shift"] != 0).any()):
        x = _hed_jitter(x, p["hed_scale"], p["hed_shift"])
    col = lambda v: v[:, None, None, None]  # noqa: E731
    if bool((p["brightness"] != 1).any()):
        x = (x * col(p["brightness"])).clamp_(0.0, 1.0)
    if bool((p["contrast"] != 1).any()):
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * col(p["contrast"]) + mean).clamp_(0.0, 1.0)
    if bool((p["saturation"] != 1).any()):
        g = _gray(x)
        x = ((x - g) * col(p["saturation"]) + g).clamp_(0.0, 1.0)
    if bool((p["hue"] != 0).any()):
        x = _hue_rotate(x, p["hue"])
    if bool(p["grayscale"].any()):
        x = torch.where(col(p["grayscale"]), _gray(x).expand_as(x), x)
    x = _blur(x, p["blur_sigma"])
    return x.clamp_(0.0, 1.0).contiguous()


def _check_out_size(owner: str, out_size: int) -> int:
    validate_params(owner, {"out_size": out_size}, {"out_size": [Interval(int, 8, None)]},
                    hint="(the output tile edge, px)")
    return int(out_size)


def apply_params(tiles: Any, params: AugmentParams, *, out_size: int) -> torch.Tensor:
    """Apply the **same** augmentation ``params`` to every tile of a batch.

    Args:
        tiles: uint8 ``(B, 3, H, W)`` or float ``(B, 3, H, W)`` in [0, 1] (torch or numpy); the
            work happens on ``tiles.device``.
        params: one draw from :func:`sample_params` (``AugmentParams()`` = resize only).
        out_size: edge of the output tiles in pixels.

    Returns:
        float32 tensor on the input's device.

    Shape:
        ``(B, 3, H, W) -> (B, 3, out_size, out_size)``, values in [0, 1].
    """
    if not isinstance(params, AugmentParams):
        raise ConfigError(f"params must be an AugmentParams; got {type(params).__name__}.")
    out_size = _check_out_size("apply_params", out_size)
    x = _as_float_nchw(tiles)
    if x.shape[0] == 0:
        return x.new_zeros((0, 3, out_size, out_size))
    return _apply(x, _stack([params] * x.shape[0], x.device), out_size)


def random_augment(
    tiles: Any,
    rng: np.random.Generator,
    cfg: str | AugmentConfig = "histo",
    *,
    out_size: int,
) -> torch.Tensor:
    """Augment every tile with its **own** draw of :func:`sample_params` (tile-level SSL views).

    Equivalent to ``apply_params(tiles[i:i+1], sample_params(rng, cfg))`` for each ``i`` in order,
    but batched.

    Shape:
        ``(B, 3, H, W)`` uint8 or float in [0, 1] ``-> (B, 3, out_size, out_size)`` float32.
    """
    out_size = _check_out_size("random_augment", out_size)
    c = get_augment_config(cfg)
    x = _as_float_nchw(tiles)
    if x.shape[0] == 0:
        return x.new_zeros((0, 3, out_size, out_size))
    params = [sample_params(rng, c) for _ in range(x.shape[0])]
    return _apply(x, _stack(params, x.device), out_size)
