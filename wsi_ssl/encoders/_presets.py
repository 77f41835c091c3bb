"""Pathology foundation-model presets: the exact architecture, preprocessing and output rule of
each published tile encoder, and where its weights come from.

Facts are read from each model's own hub config and model card (see ``docs/encoders.md`` for the
sources and the items we could not confirm); architectures are timm (or, for a few models,
``transformers``) modules built here from those keyword arguments, never from downloaded code.
A preset never carries weights: they are local files (:mod:`wsi_ssl.encoders._hub`).

Output rules (applied to the final, normalised token sequence ``tokens`` of shape
``(B, 1 + R + N, D)``: class token, ``R`` register tokens, ``N`` patch tokens):

- ``"cls"``: ``tokens[:, 0]`` (``D`` features).
- ``"cls+mean"``: ``cat(tokens[:, 0], tokens[:, 1 + R:].mean(1))`` (``2 D`` features; register
  tokens are excluded from the mean).
- ``"pooler"``: the ``pooler_output`` of a ``transformers`` model, or the model's own pooled
  output for the ``"conch"`` family (CONCH v1.5: contrastive attentional pooler + LayerNorm).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from wsi_ssl.encoders._slide_conch import ConchVisionTower
from wsi_ssl.errors import BackendUnavailableError, ConfigError

__all__ = ["EncoderPreset", "HubPreset", "PresetModel", "get_preset", "list_presets", "register_preset",
           "build_trunk", "transformers_config",
           "IMAGENET", "BIOPTIMUS", "HIBOU", "HALF"]

Norm = tuple[tuple[float, float, float], tuple[float, float, float]]
#: (mean, std) on the [0, 1] scale.
IMAGENET: Norm = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS: Norm = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU: Norm = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
HALF: Norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

OutputRule = Literal["cls", "cls+mean", "pooler"]
Family = Literal["timm", "transformers", "conch"]

# keyword values that are classes in timm, written as names here (JSON-friendly, hashable)
_LAYERS = {"swiglu_packed": ("timm.layers", "SwiGLUPacked"), "silu": ("torch.nn", "SiLU")}


class HubPreset:
    """What tile and slide presets share: weights in a Hugging Face hub repo (``hub_repo``),
    and a JSON-friendly description. Subclasses are frozen keyword-only dataclasses."""

    hub_repo: str

    @property
    def download_command(self) -> str:
        """The command that fetches the weights on a connected machine."""
        return f"huggingface-cli download {self.hub_repo} --local-dir {self.local_dir_name}/"

    @property
    def local_dir_name(self) -> str:
        return self.hub_repo.split("/")[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (store attrs, ``wsi-ssl encoders``)."""
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["kwargs"] = dict(self.kwargs)  # type: ignore[attr-defined]
        return d


@dataclass(frozen=True, kw_only=True)
class EncoderPreset(HubPreset):
    """A published tile encoder, described exactly.

    Attributes:
        name: the wsi-ssl name (``create_encoder(name)``).
        aliases: other names accepted for it (e.g. TRIDENT's ``uni_v1``).
        family: ``"timm"`` (``timm.create_model(arch, **kwargs)``), ``"transformers"``
            (``transformers.<arch>(<arch>Config(**kwargs))``; needs ``pip install transformers``)
            or ``"conch"`` (CONCH v1.5's vision tower, :mod:`wsi_ssl.encoders._slide_conch`).
        arch: timm architecture name or ``transformers`` model class name.
        kwargs: keyword arguments of the architecture (``"swiglu_packed"`` / ``"silu"`` stand for
            ``timm.layers.SwiGLUPacked`` / ``torch.nn.SiLU``).
        mean, std: RGB normalisation on the [0, 1] scale.
        input_size: edge (px) of the tensor the model sees.
        resize_size: tiles are first resized to this edge (px), then centre-cropped to
            ``input_size`` (equal: no crop).
        interpolation: ``"bilinear"`` or ``"bicubic"`` (antialiased) for that resize.
        output: the output rule (module docstring).
        embed_dim: length of the feature vector the rule produces.
        mpp: µm/px the model was trained at (20x ≈ 0.5).
        tile_size: tile edge (px) at ``mpp`` the model was trained on (``embed`` default).
        license: licence of the weights (SPDX-like).
        gated: whether the hub repo needs an accepted licence and a login to download.
        hub_repo: Hugging Face repo id of the weights.
        weight_files: the weight file names in that repo, preferred first.
        params_published: parameter count (millions) published for the model.
        extra: the pip extra needed (``"transformers"``) or ``None``.
        notes: facts not confirmed from a primary source, and other caveats.
    """

    name: str
    aliases: tuple[str, ...] = ()
    family: Family = "timm"
    arch: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    input_size: int = 224
    resize_size: int = 224
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    output: OutputRule = "cls"
    embed_dim: int
    mpp: float = 0.5
    tile_size: int = 224
    license: str
    gated: bool = True
    hub_repo: str
    weight_files: tuple[str, ...] = ("pytorch_model.bin",)
    params_published: float
    extra: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.output not in ("cls", "cls+mean", "pooler"):
            raise ConfigError(f"preset {self.name!r}: output={self.output!r} must be 'cls', "
                              "'cls+mean' or 'pooler'.")
        if self.interpolation not in ("bilinear", "bicubic"):
            raise ConfigError(f"preset {self.name!r}: interpolation={self.interpolation!r} must "
                              "be 'bilinear' or 'bicubic'.")
        if self.resize_size < self.input_size:
            raise ConfigError(f"preset {self.name!r}: resize_size={self.resize_size} is smaller "
                              f"than input_size={self.input_size}.")
        if self.family not in ("timm", "transformers", "conch"):
            raise ConfigError(f"preset {self.name!r}: family={self.family!r} must be 'timm', "
                              "'transformers' or 'conch'.")

def _timm(name: str, arch: str, dim: int, params: float, **kw: Any) -> EncoderPreset:
    timm_kwargs = kw.pop("kwargs")
    return EncoderPreset(name=name, family="timm", arch=arch, embed_dim=dim,
                         params_published=params, kwargs=timm_kwargs, **kw)


_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_KAIKO = dict(mean=HALF[0], std=HALF[1], license="Apache-2.0", gated=False, tile_size=256,
              weight_files=("model.safetensors", "pytorch_model.bin"),
              notes="timm port of kaiko-ai/towards_large_pathology_fms by 1aurent")
_BIO = dict(mean=BIOPTIMUS[0], std=BIOPTIMUS[1], interpolation="bicubic",
            weight_files=("model.safetensors", "pytorch_model.bin"))

_PRESETS: tuple[EncoderPreset, ...] = (
    _timm("uni", "vit_large_patch16_224", 1024, 303.4, aliases=("uni_v1", "UNI"),
          kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0,
                  "dynamic_img_size": True},
          tile_size=256, license="CC-BY-NC-ND-4.0", hub_repo="MahmoodLab/UNI"),
    _timm("uni2-h", "vit_giant_patch14_224", 1536, 681.4, aliases=("uni_v2", "UNI2-h"),
          kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                  "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                  "num_classes": 0, "no_embed_class": True, **_SWIGLU, "reg_tokens": 8,
                  "dynamic_img_size": True},
          tile_size=256, license="CC-BY-NC-ND-4.0", hub_repo="MahmoodLab/UNI2-h"),
    _timm("virchow", "vit_huge_patch14_224", 2560, 631.2, aliases=("Virchow",),
          kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                  "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
          output="cls+mean", interpolation="bicubic", license="Apache-2.0",
          hub_repo="paige-ai/Virchow"),
    _timm("virchow2", "vit_huge_patch14_224", 2560, 631.2, aliases=("Virchow2",),
          kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375,
                  "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True, **_SWIGLU},
          output="cls+mean", interpolation="bicubic", license="CC-BY-NC-ND-4.0",
          hub_repo="paige-ai/Virchow2", notes="trained at 5x-40x; 0.5 µm/px is the default"),
    _timm("h-optimus-0", "vit_giant_patch14_reg4_dinov2", 1536, 1134.8,
          aliases=("hoptimus0", "H-optimus-0"),
          kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
                  "dynamic_img_size": False},
          license="Apache-2.0", hub_repo="bioptimus/H-optimus-0", gated=False, **_BIO),
    _timm("h-optimus-1", "vit_giant_patch14_reg4_dinov2", 1536, 1134.8,
          aliases=("hoptimus1", "H-optimus-1"),
          kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "global_pool": "token",
                  "dynamic_img_size": False},
          license="CC-BY-NC-ND-4.0", hub_repo="bioptimus/H-optimus-1", **_BIO),
    _timm("h0-mini", "vit_base_patch14_reg4_dinov2", 1536, 85.7, aliases=("hoptimus0mini",
                                                                          "H0-mini"),
          kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.33334,
                  **_SWIGLU},
          output="cls+mean", license="CC-BY-NC-ND-4.0", hub_repo="bioptimus/H0-mini",
          notes="mlp_ratio 5.33334 inferred from the published 85.7 M parameters (unconfirmed "
          "against the hub config); the card also suggests CLS only (768) for linear probes",
          **_BIO),
    _timm("prov-gigapath", "vit_giant_patch14_dinov2", 1536, 1134.9,
          aliases=("gigapath", "prov_gigapath"),
          kwargs={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                  "num_heads": 24, "mlp_ratio": 5.33334, "init_values": 1e-5, "num_classes": 0},
          resize_size=256, interpolation="bicubic", tile_size=256, license="Apache-2.0",
          hub_repo="prov-gigapath/prov-gigapath"),
    _timm("kaiko-vits16", "vit_small_patch16_224", 384, 21.7, aliases=("kaiko_vits16",),
          kwargs={"num_classes": 0, "dynamic_img_size": True},
          hub_repo="1aurent/vit_small_patch16_224.kaiko_ai_towards_large_pathology_fms", **_KAIKO),
    _timm("kaiko-vits8", "vit_small_patch8_224", 384, 21.7, aliases=("kaiko_vits8",),
          kwargs={"num_classes": 0, "dynamic_img_size": True},
          hub_repo="1aurent/vit_small_patch8_224.kaiko_ai_towards_large_pathology_fms", **_KAIKO),
    _timm("kaiko-vitb16", "vit_base_patch16_224", 768, 85.8, aliases=("kaiko_vitb16",),
          kwargs={"num_classes": 0, "dynamic_img_size": True},
          hub_repo="1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms", **_KAIKO),
    _timm("kaiko-vitb8", "vit_base_patch8_224", 768, 85.8, aliases=("kaiko_vitb8",),
          kwargs={"num_classes": 0, "dynamic_img_size": True},
          hub_repo="1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms", **_KAIKO),
    _timm("kaiko-vitl14", "vit_large_patch14_reg4_dinov2", 1024, 303.2, aliases=("kaiko_vitl14",),
          kwargs={"img_size": 224, "num_classes": 0, "dynamic_img_size": True},
          hub_repo="1aurent/vit_large_patch14_reg4_224.kaiko_ai_towards_large_pathology_fms",
          **_KAIKO),
    # -- optional extra: transformers ---------------------------------------------------------
    EncoderPreset(name="phikon", family="transformers", arch="ViTModel", embed_dim=768,
                  params_published=85.8, extra="transformers", aliases=("Phikon",),
                  kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "intermediate_size": 3072, "image_size": 224, "patch_size": 16,
                          "layer_norm_eps": 1e-12, "qkv_bias": True},
                  license="Owkin non-commercial", gated=False, hub_repo="owkin/phikon",
                  weight_files=("model.safetensors", "pytorch_model.bin"),
                  notes="pooler weights in the file, if any, are ignored (CLS output)"),
    EncoderPreset(name="phikon-v2", family="transformers", arch="Dinov2Model", embed_dim=1024,
                  params_published=303.4, extra="transformers", aliases=("phikon_v2",),
                  kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 224, "patch_size": 16, "mlp_ratio": 4,
                          "layerscale_value": 1e-5, "layer_norm_eps": 1e-6},
                  license="Owkin non-commercial", gated=False, hub_repo="owkin/phikon-v2",
                  weight_files=("model.safetensors",),
                  notes="image_size/layerscale from the Dinov2 config family (unconfirmed)"),
    EncoderPreset(name="hibou-b", family="transformers", arch="Dinov2WithRegistersModel",
                  embed_dim=768, params_published=85.7, extra="transformers", output="pooler",
                  aliases=("hibou_b",), mean=HIBOU[0], std=HIBOU[1], interpolation="bicubic",
                  kwargs={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                          "image_size": 224, "patch_size": 14, "num_register_tokens": 4},
                  license="Apache-2.0", gated=False, hub_repo="histai/hibou-b",
                  weight_files=("model.safetensors",),
                  notes="the hub ships custom modelling code; key names of its checkpoint vs "
                  "transformers' Dinov2WithRegisters are unconfirmed"),
    EncoderPreset(name="hibou-l", family="transformers", arch="Dinov2WithRegistersModel",
                  embed_dim=1024, params_published=303.2, extra="transformers", output="pooler",
                  aliases=("hibou_l",), mean=HIBOU[0], std=HIBOU[1], interpolation="bicubic",
                  kwargs={"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                          "image_size": 224, "patch_size": 14, "num_register_tokens": 4},
                  license="Apache-2.0", hub_repo="histai/hibou-L",
                  weight_files=("model.safetensors",),
                  notes="as hibou-b: checkpoint key names unconfirmed"),
    EncoderPreset(name="midnight-12k", family="transformers", arch="Dinov2Model",
                  embed_dim=3072, params_published=1134.8, extra="transformers",
                  output="cls+mean", aliases=("midnight12k", "midnight"), mean=HALF[0],
                  std=HALF[1],
                  kwargs={"hidden_size": 1536, "num_hidden_layers": 40, "num_attention_heads": 24,
                          "image_size": 224, "patch_size": 14, "use_swiglu_ffn": True,
                          "layer_norm_eps": 1e-6},
                  license="MIT", hub_repo="kaiko-ai/midnight",
                  weight_files=("model.safetensors",),
                  notes="position-embedding size (image_size) of the checkpoint unconfirmed"),
    # -- the tile encoder of TITAN and FEATHER ----------------------------------------------------
    EncoderPreset(name="conch-v1.5", family="conch", arch="ConchVisionTower", embed_dim=768,
                  params_published=306.1, output="pooler",
                  aliases=("conch_v15", "conchv1_5", "CONCHv1.5"),
                  kwargs={"depth": 24, "embed_dim": 1024, "num_heads": 16, "patch_size": 16,
                          "img_size": 224, "init_values": 1.0, "out_dim": 768,
                          "pooler_heads": 8},
                  input_size=448, resize_size=448, interpolation="bilinear", tile_size=512,
                  license="CC-BY-NC-ND-4.0", hub_repo="MahmoodLab/conchv1_5",
                  weight_files=("pytorch_model_vision.bin",),
                  notes="no exact published parameter count (ViT-L trunk + pooler, 306.1 M "
                  "built); the checkpoint's position table is assumed 14 x 14 (a 224-px "
                  "table, interpolated to 28 x 28 at 448 px as published): unconfirmed"),
)

_BY_NAME: dict[str, EncoderPreset] = {}
for _p in _PRESETS:
    for _n in (_p.name, *_p.aliases):
        _BY_NAME[_n.lower()] = _p


def get_preset(name: str) -> EncoderPreset | None:
    """The preset called ``name`` (or one of its aliases, case-insensitive); ``None`` if
    ``name`` is not a foundation-model preset.

    ``wsi-ssl embed --encoder NAME`` uses ``preset.mpp`` and ``preset.tile_size`` as the
    defaults of ``--mpp`` / ``--tile-size``.
    """
    return _BY_NAME.get(str(name).lower())


def list_presets() -> list[str]:
    """The canonical preset names, in table order (built-in presets first)."""
    return [p.name for p in _PRESETS] + [p.name for p in _USER.values()]


_USER: dict[str, EncoderPreset] = {}


def register_preset(preset: EncoderPreset, *, overwrite: bool = False) -> EncoderPreset:
    """Add a preset of your own (e.g. a fine-tuned variant: ``dataclasses.replace(
    get_preset("uni"), name="my-uni", hub_repo=...)``). It travels with encoders built from it,
    so dask workers rebuild it without registering it themselves.

    Raises:
        ConfigError: the name or an alias is taken (pass ``overwrite=True`` to replace a preset
            registered earlier; built-in presets cannot be replaced).
    """
    if not isinstance(preset, EncoderPreset):
        raise ConfigError(f"register_preset needs an EncoderPreset; got {type(preset).__name__}.")
    for n in (preset.name, *preset.aliases):
        old = _BY_NAME.get(n.lower())
        if old is not None and (old.name not in _USER or not overwrite or old.name != preset.name):
            raise ConfigError(f"encoder preset name {n!r} is taken by {old.name!r}; choose "
                              "another name" + (" (pass overwrite=True to replace it)"
                                                if old.name in _USER else "") + ".")
    _USER[preset.name] = preset
    for n in (preset.name, *preset.aliases):
        _BY_NAME[n.lower()] = preset
    return preset


def is_builtin(preset: EncoderPreset) -> bool:
    return preset.name not in _USER


def preset_from_dict(d: dict[str, Any]) -> EncoderPreset:
    """Inverse of :meth:`EncoderPreset.to_dict` (tuples restored)."""
    d = dict(d)
    for key in ("aliases", "weight_files", "mean", "std"):
        d[key] = tuple(d[key])
    return EncoderPreset(**d)


def _resolve_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:

    out = {}
    for key, value in kwargs.items():
        if isinstance(value, str) and value in _LAYERS and key in ("mlp_layer", "act_layer"):
            mod, attr = _LAYERS[value]
            value = getattr(importlib.import_module(mod), attr)
        out[key] = value
    return out


def build_trunk(preset: EncoderPreset, overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """The architecture of ``preset`` (random init; wrap in ``torch.device("meta")`` to build
    without memory). ``overrides`` replace architecture keyword arguments (e.g. ``depth=1``
    for tests)."""
    kwargs = _resolve_kwargs({**preset.kwargs, **(overrides or {})})
    if preset.family == "conch":
        return ConchVisionTower(**kwargs)
    if preset.family == "timm":
        import timm  # lazy: timm only when an encoder is built

        return timm.create_model(preset.arch, pretrained=False, **kwargs)
    model_cls, config, init_kwargs = transformers_config(preset, kwargs)
    return model_cls(config, **init_kwargs)


def transformers_config(preset: EncoderPreset, kwargs: Mapping[str, Any]
                        ) -> tuple[type, Any, dict[str, Any]]:
    """``(model class, config, constructor keyword arguments)`` of a ``transformers`` preset
    with architecture keyword arguments ``kwargs`` (the preset's, overrides applied).

    Raises:
        BackendUnavailableError: ``transformers`` is not installed.
    """
    try:
        import transformers  # lazy: optional extra `transformers`
    except ImportError as err:
        raise BackendUnavailableError(
            f"preset {preset.name!r} is a transformers model; install it with "
            "`pip install \"wsi-ssl[transformers]\"`.") from err
    kwargs = dict(kwargs)
    if "depth" in kwargs:  # the timm spelling, accepted for every family
        kwargs["num_hidden_layers"] = kwargs.pop("depth")
    model_cls = getattr(transformers, preset.arch)
    config = getattr(transformers, preset.arch.replace("Model", "Config"))(**kwargs)
    # the CLS rule never uses ViT's pooler; checkpoints holding one load with it ignored
    init_kwargs = {"add_pooling_layer": False} if preset.arch == "ViTModel" else {}
    return model_cls, config, init_kwargs


def _prefix_tokens(trunk: nn.Module) -> int:
    n = getattr(trunk, "num_prefix_tokens", None)
    if n is not None:
        return int(n)
    return 1 + int(getattr(getattr(trunk, "config", None), "num_register_tokens", 0) or 0)


class PresetModel(nn.Module):
    """A backbone and its output rule: normalised ``(B, 3, S, S)`` -> ``(B, D)`` features.

    Shape:
        x: ``(B, 3, S, S)``; returns ``(B, embed_dim)``.
    """

    def __init__(self, trunk: nn.Module, *, family: Family, output: OutputRule) -> None:
        super().__init__()
        self.trunk = trunk
        self.family = family
        self.output = output
        self.num_prefix_tokens = _prefix_tokens(trunk)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The final normalised token sequence ``(B, 1 + R + N, D)``."""
        if self.family in ("timm", "conch"):
            return self.trunk.forward_features(x)
        return self.trunk(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "conch":
            return self.trunk(x)
        if self.output == "pooler":
            return self.trunk(pixel_values=x).pooler_output
        tokens = self.tokens(x)
        if self.output == "cls":
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.num_prefix_tokens:].mean(1)], dim=-1)
