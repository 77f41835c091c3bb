"""Slide-encoder presets: the published slide foundation models, described exactly (architecture
and its keyword arguments, the tile encoder and tile grid it needs, how positions are made, the
output, precision, licence and where the weights live). Sources are in ``docs/slide-encoders.md``.

Positions (``positions``), computed from the store's level-0 coordinates and the slide's
``stride_level0`` attribute (level-0 px between neighbouring tiles), never from a guessed patch
size:

- ``"grid-origin"`` (TITAN): cell ``round((xy - min(xy)) / stride)``: the grid starts at the
  slide's first tile; identical for the same tissue scanned at 20x (stride 512) and 40x (1024).
- ``"grid-absolute"`` (Prov-GigaPath): cell ``round(xy / stride)`` from the slide origin, which
  must fall inside the model's position table (``slide_ngrids`` cells a side).
- ``"none"`` (PRISM, FEATHER): positions are not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from wsi_ssl.encoders._presets import HubPreset
from wsi_ssl.errors import ConfigError

__all__ = ["SlideEncoderPreset", "get_slide_preset", "list_slide_encoders", "SLIDE_PRESETS"]

Arch = Literal["titan", "longnet-vit", "prism-perceiver", "abmil"]
Positions = Literal["grid-origin", "grid-absolute", "none"]
Precision = Literal["float16", "bfloat16", "float32"]


@dataclass(frozen=True, kw_only=True)
class SlideEncoderPreset(HubPreset):
    """A published slide encoder, described exactly.

    Attributes:
        name: the wsi-ssl name (``create_slide_encoder(name)``, ``--slide-encoder``).
        aliases: other accepted names (TRIDENT's ``titan``, ``gigapath``, ...).
        arch: architecture family (``wsi_ssl.encoders.slide`` module).
        kwargs: architecture keyword arguments (published values).
        tile_encoder: the tile-encoder preset whose features it takes (``wsi-ssl embed
            --encoder``).
        tile_dim: tile feature dimension it takes.
        mpp: µm/px of the tiles it was trained on.
        tile_size: tile edge (px at ``mpp``) it was trained on.
        positions: how level-0 coordinates become its position inputs (module docstring).
        output: how the slide embedding is read out (one line).
        embed_dim: slide embedding length.
        precision: the published inference precision on CUDA (float32 on the CPU).
        batched: whether several slides go through one forward pass (padding masks are exact
            for this architecture); otherwise one slide per pass.
        license: licence of the weights.
        gated: whether the hub repo needs an accepted licence and a login.
        hub_repo: Hugging Face repo of the weights.
        weight_files: weight file names in that repo, preferred first.
        standard_files: also accept ``model.safetensors`` / ``pytorch_model.bin`` in a folder or
            the cache (False where the repo holds another model under those names).
        ignore: key prefixes in the checkpoint that belong to parts not built (text towers).
        params_published: published parameter count (millions) of what is built.
        params_source: where that count is published.
        notes: facts not confirmed from a primary source, and other caveats.
    """

    name: str
    aliases: tuple[str, ...] = ()
    arch: Arch
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    tile_encoder: str
    tile_dim: int
    mpp: float = 0.5
    tile_size: int
    positions: Positions
    output: str
    embed_dim: int
    precision: Precision = "float16"
    batched: bool = False
    license: str
    gated: bool = True
    hub_repo: str
    weight_files: tuple[str, ...]
    standard_files: bool = True
    ignore: tuple[str, ...] = ()
    params_published: float
    params_source: str
    notes: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ("titan", "longnet-vit", "prism-perceiver", "abmil"):
            raise ConfigError(f"slide preset {self.name!r}: unknown arch {self.arch!r}.")
        if self.positions not in ("grid-origin", "grid-absolute", "none"):
            raise ConfigError(f"slide preset {self.name!r}: unknown positions "
                              f"{self.positions!r}.")
        if self.precision not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"slide preset {self.name!r}: precision={self.precision!r} must be "
                              "float16, bfloat16 or float32.")

    @property
    def embed_command(self) -> str:
        """The ``wsi-ssl embed`` command that makes the tiles this slide encoder needs."""
        return (f"wsi-ssl embed SLIDES/ --store NEW.zarr --encoder {self.tile_encoder} "
                f"--mpp {self.mpp:g} --tile-size {self.tile_size}")


_MAHMOOD = dict(license="CC-BY-NC-ND-4.0", gated=True)
_FEATHER_NOTE = ("MIL-Lab's README gives '0.9M' for all three FEATHER-24K models (a rounded "
                 "figure: the published base config gives 0.79 M with CONCH v1.5, 0.92 M with "
                 "UNI, 1.18 M with UNI2-h tiles); key prefix of the hub file ('model.' or none) "
                 "unconfirmed, both load")


def _feather(name: str, tile: str, dim: int, repo: str, params: float, aliases: tuple[str, ...],
             tile_size: int) -> SlideEncoderPreset:
    return SlideEncoderPreset(
        name=name, aliases=aliases, arch="abmil", kwargs={"in_dim": dim, "embed_dim": 512,
                                                         "attn_dim": 384},
        tile_encoder=tile, tile_dim=dim, mpp=0.5, tile_size=tile_size, positions="none",
        output="attention-weighted mean of the embedded tiles (gated ABMIL)", embed_dim=512,
        precision="float32", batched=True, hub_repo=repo,
        weight_files=("model.safetensors", "pytorch_model.bin"), params_published=params,
        params_source="MIL-Lab abmil/base.yaml + ENCODER_DIM_MAPPING (README: '0.9M')",
        notes=_FEATHER_NOTE, **_MAHMOOD)


SLIDE_PRESETS: tuple[SlideEncoderPreset, ...] = (
    SlideEncoderPreset(
        name="titan", aliases=("TITAN", "titan-preview"), arch="titan",
        kwargs={"in_dim": 768, "dim": 768, "depth": 6, "heads": 12, "mlp_ratio": 4.0,
                "pooler_heads": 8, "pooler_queries": 128},
        tile_encoder="conch-v1.5", tile_dim=768, mpp=0.5, tile_size=512,
        positions="grid-origin",
        output="contrastive attentional pooler over the class and tile tokens, before the "
               "projection (encode_slide_from_patch_features)",
        embed_dim=768, precision="float16", hub_repo="MahmoodLab/TITAN",
        weight_files=("model.safetensors",), ignore=("text_encoder.",),
        params_published=48.5, params_source="FEATHER paper / MIL-Lab benchmark table "
        "('TITAN 48.5M'); slide2vec README '49M'",
        notes="vision side only (text encoder weights in the file are ignored); grid from "
              "stride_level0 (TITAN's patch_size_lv0: 512 at 20x, 1024 at 40x)", **_MAHMOOD),
    SlideEncoderPreset(
        name="gigapath-slide", aliases=("gigapath_slide", "prov-gigapath-slide"),
        arch="longnet-vit",
        kwargs={"in_dim": 1536, "dim": 768, "depth": 12, "heads": 16, "ffn_dim": 3072,
                "slide_ngrids": 1000, "global_pool": False, "output_layer": None},
        tile_encoder="prov-gigapath", tile_dim=1536, mpp=0.5, tile_size=256,
        positions="grid-absolute",
        output="class token of the last layer after the encoder's and the model's LayerNorm "
               "(the model card's slide_encoder(tiles, coords))",
        embed_dim=768, precision="float16", license="Apache-2.0", gated=True,
        hub_repo="prov-gigapath/prov-gigapath", weight_files=("slide_encoder.pth",),
        standard_files=False, params_published=87.0,
        params_source="slide2vec README ('Prov-GigaPath slide, LongNet, 87M')",
        notes="positions use stride_level0 (TRIDENT's patch_size_level0); the reference code "
              "divides level-0 coordinates by 256 whatever the magnification. TRIDENT reads "
              "the mean tile token after layer 11 instead (output_layer=11, global_pool=True)"),
    SlideEncoderPreset(
        name="prism", aliases=("PRISM", "Prism"), arch="prism-perceiver",
        kwargs={"latent_seq": 512, "latent_dim": 1280, "context_dim": 2560, "mhsa_heads": 8,
                "perceiver_depth": 8, "transformer_depth": 6, "share_xattn_start_layer": 1,
                "share_tf_start_layer": 0, "xattn_heads": 1, "mlp_mult": 1},
        tile_encoder="virchow", tile_dim=2560, mpp=0.5, tile_size=224, positions="none",
        output="LayerNorm of the first Perceiver latent (slide_representations "
               "'image_embedding')",
        embed_dim=1280, precision="float16", batched=True, license="CC-BY-NC-ND-4.0",
        hub_repo="paige-ai/Prism", weight_files=("model.safetensors", "pytorch_model.bin"),
        ignore=("text_decoder.", "img_to_latents.", "text_to_latents.", "temperature"),
        params_published=99.0, params_source="slide2vec README ('PRISM, Perceiver, 99M')",
        notes="slide-representation side only (BioGPT decoder and contrastive heads ignored); "
              "hub weight file name unconfirmed (model.safetensors or pytorch_model.bin)"),
    _feather("feather", "conch-v1.5", 768, "MahmoodLab/abmil.base.conch_v15.pc108-24k", 0.788,
             ("feather-conch-v1.5", "abmil.base.conch_v15.pc108-24k"), 512),
    _feather("feather-uni2", "uni2-h", 1536, "MahmoodLab/abmil.base.uni_v2.pc108-24k", 1.181,
             ("abmil.base.uni_v2.pc108-24k",), 256),
    _feather("feather-uni", "uni", 1024, "MahmoodLab/abmil.base.uni.pc108-24k", 0.919,
             ("abmil.base.uni.pc108-24k",), 256),
)

_BY_NAME: dict[str, SlideEncoderPreset] = {}
for _p in SLIDE_PRESETS:
    for _n in (_p.name, *_p.aliases):
        _BY_NAME[_n.lower()] = _p


def get_slide_preset(name: str) -> SlideEncoderPreset | None:
    """The slide preset called ``name`` (or an alias, case-insensitive); ``None`` if unknown."""
    return _BY_NAME.get(str(name).lower())


def list_slide_encoders() -> list[str]:
    """The slide-encoder preset names, in table order."""
    return [p.name for p in SLIDE_PRESETS]
