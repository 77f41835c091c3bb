"""Foundation-model presets: architecture (meta-device builds, parameter counts, pinned state-dict
manifests), preprocessing constants, output rules against the models' own timm forward, aliases.

The manifests in ``tests/encoders/manifests/`` pin the key names and shapes a real checkpoint must
hold; after a deliberate change regenerate them with ``WSI_SSL_UPDATE_MANIFESTS=1 pytest
tests/encoders/test_presets.py`` and review the diff.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsi_ssl.encoders import create_encoder, get_preset, list_encoders, list_presets
from wsi_ssl.encoders._loading import expected_shapes
from wsi_ssl.encoders._presets import PresetModel, build_trunk

MANIFESTS = Path(__file__).parent / "manifests"
D1 = {"depth": 1}

# Published parameter counts (millions): model cards / papers; GigaPath and H-optimus: "1.1 B"
# (1.13 B in timm), Virchow/Virchow2 632 M (paper) = 631.2 M in timm, UNI 303 M, UNI2-h 681 M.
PUBLISHED = {"uni": 303.4, "uni2-h": 681.4, "virchow": 631.2, "virchow2": 631.2,
             "h-optimus-0": 1134.8, "h-optimus-1": 1134.8, "h0-mini": 85.7,
             "prov-gigapath": 1134.9, "kaiko-vits16": 21.7, "kaiko-vits8": 21.7,
             "kaiko-vitb16": 85.8, "kaiko-vitb8": 85.8, "kaiko-vitl14": 303.2, "phikon": 85.8,
             "phikon-v2": 303.4, "hibou-b": 85.7, "hibou-l": 303.2, "midnight-12k": 1134.8,
             "conch-v1.5": 306.1}
REQUIRED = ["uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1", "h0-mini",
            "prov-gigapath", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8",
            "kaiko-vitl14"]

IN = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIO = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIB = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
HALF = ((0.5,) * 3, (0.5,) * 3)
# name: (mean/std, embed dim, output rule, prefix tokens, resize -> crop, interpolation, µm/px, tile)
PUBLISHED_PREPROCESSING = {
    "uni": (IN, 1024, "cls", 1, (224, 224), "bilinear", 0.5, 256),
    "uni2-h": (IN, 1536, "cls", 9, (224, 224), "bilinear", 0.5, 256),
    "virchow": (IN, 2560, "cls+mean", 1, (224, 224), "bicubic", 0.5, 224),
    "virchow2": (IN, 2560, "cls+mean", 5, (224, 224), "bicubic", 0.5, 224),
    "h-optimus-0": (BIO, 1536, "cls", 5, (224, 224), "bicubic", 0.5, 224),
    "h-optimus-1": (BIO, 1536, "cls", 5, (224, 224), "bicubic", 0.5, 224),
    "h0-mini": (BIO, 1536, "cls+mean", 5, (224, 224), "bicubic", 0.5, 224),
    "prov-gigapath": (IN, 1536, "cls", 1, (256, 224), "bicubic", 0.5, 256),
    "kaiko-vits16": (HALF, 384, "cls", 1, (224, 224), "bilinear", 0.5, 256),
    "kaiko-vitl14": (HALF, 1024, "cls", 5, (224, 224), "bilinear", 0.5, 256),
    "hibou-b": (HIB, 768, "pooler", 5, (224, 224), "bicubic", 0.5, 224),
    "midnight-12k": (HALF, 3072, "cls+mean", 1, (224, 224), "bilinear", 0.5, 224),
    "conch-v1.5": (IN, 768, "pooler", 1, (448, 448), "bilinear", 0.5, 512),
}


def _manifest(name: str) -> dict:
    shapes = expected_shapes(get_preset(name))
    blocks = re.compile(r"^(?:trunk\.)?(blocks|encoder\.layer|layers)\.(\d+)\.(.*)$")
    depth = 1 + max(int(m.group(2)) for k in shapes if (m := blocks.match(k)))
    items = sorted((k, list(s)) for k, s in shapes.items())
    return {
        "preset": name,
        "n_tensors": len(shapes),
        "n_params": sum(math.prod(s) for s in shapes.values()),
        "depth": depth,
        "sha256_keys_shapes": hashlib.sha256(json.dumps(items).encode()).hexdigest(),
        "outside_blocks": {k: list(s) for k, s in sorted(shapes.items()) if not blocks.match(k)},
        "block_0": {m.group(3): list(s) for k, s in sorted(shapes.items())
                    if (m := blocks.match(k)) and m.group(2) == "0"},
    }


def test_every_required_preset_is_listed_with_aliases():
    names = list_encoders()
    assert all(n in names for n in REQUIRED)
    assert set(PUBLISHED) == set(list_presets())
    for alias, name in [("uni_v1", "uni"), ("uni_v2", "uni2-h"), ("hoptimus0", "h-optimus-0"),
                        ("hoptimus1", "h-optimus-1"), ("gigapath", "prov-gigapath"),
                        ("UNI", "uni"), ("Virchow2", "virchow2")]:
        assert get_preset(alias).name == name
    assert get_preset("resnet18") is None and get_preset("tiny-cnn") is None


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_meta_build_params_and_output_dim(name):
    preset = get_preset(name)
    with torch.device("meta"):
        trunk = build_trunk(preset)
        model = PresetModel(trunk, family=preset.family, output=preset.output)
        out = model(torch.empty(2, 3, preset.input_size, preset.input_size))
    n = sum(p.numel() for p in trunk.parameters())
    assert n / 1e6 == pytest.approx(PUBLISHED[name], rel=0.002), f"{name}: {n / 1e6:.2f} M"
    assert preset.params_published == PUBLISHED[name]
    assert tuple(out.shape) == (2, preset.embed_dim)
    if preset.family == "timm":  # timm's fused scaled-dot-product attention in every block
        assert all(b.attn.fused_attn for b in trunk.blocks)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_state_dict_manifest(name):
    path = MANIFESTS / f"{name}.json"
    now = _manifest(name)
    if os.environ.get("WSI_SSL_UPDATE_MANIFESTS"):
        path.write_text(json.dumps(now, indent=1) + "\n")
    pinned = json.loads(path.read_text())
    assert now["block_0"] == pinned["block_0"], f"{name}: block key names/shapes changed"
    assert now["outside_blocks"] == pinned["outside_blocks"]
    assert now == pinned


@pytest.mark.parametrize("name", list(PUBLISHED_PREPROCESSING))
def test_preprocessing_constants_are_the_published_ones(name):
    (mean, std), dim, rule, prefix, (resize, crop), interp, mpp, tile = \
        PUBLISHED_PREPROCESSING[name]
    p = get_preset(name)
    assert p.mean == pytest.approx(mean, abs=1e-9) and p.std == pytest.approx(std, abs=1e-9)
    assert (p.embed_dim, p.output, p.resize_size, p.input_size, p.interpolation, p.mpp,
            p.tile_size) == (dim, rule, resize, crop, interp, mpp, tile)
    enc = create_encoder(name, random_weights=True, model_kwargs=D1, device="cpu")
    assert enc.model.num_prefix_tokens == prefix
    assert (enc.mean, enc.std, enc.input_size, enc.resize_size, enc.embed_dim) == \
        (p.mean, p.std, crop, resize, dim)


def _tiles(data_dir, size=256, n=3) -> np.ndarray:
    from PIL import Image

    files = sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*"))[:n]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)))
                     for f in files])


def _reference_input(tiles: np.ndarray, preset) -> torch.Tensor:
    """The published transform, written out: resize (antialiased), centre crop, normalise."""
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = F.interpolate(x, size=(preset.resize_size,) * 2, mode=preset.interpolation,
                      antialias=True).clamp(0, 1)
    off = (preset.resize_size - preset.input_size) // 2
    x = x[..., off:off + preset.input_size, off:off + preset.input_size]
    return (x - torch.tensor(preset.mean).view(1, 3, 1, 1)) / torch.tensor(preset.std).view(
        1, 3, 1, 1)


@pytest.mark.parametrize("name", ["uni", "virchow", "virchow2", "h-optimus-0", "h0-mini",
                                  "prov-gigapath", "uni2-h", "kaiko-vitl14"])
def test_output_rule_against_the_timm_forward_of_the_model_card(name, data_dir):
    """Depth-1 instance: our embedding == the model card's recipe on timm's own forward."""
    p = get_preset(name)
    enc = create_encoder(name, random_weights=True, model_kwargs=D1, device="cpu")
    tiles = _tiles(data_dir, size=p.tile_size)
    trunk = enc.model.trunk
    with torch.inference_mode():
        x = _reference_input(tiles, p)
        if p.output == "cls":
            ref = trunk(x)  # global_pool="token": the CLS token after the final norm
            assert ref.shape == (len(tiles), p.embed_dim)
        else:  # the card's recipe: global_pool="" gives all tokens, skip the registers
            tokens = trunk.forward_head(trunk.forward_features(x), pre_logits=True) \
                if trunk.global_pool == "" else trunk.forward_features(x)
            skip = {"virchow": 1, "virchow2": 5, "h0-mini": 5}[name]
            ref = torch.cat([tokens[:, 0], tokens[:, skip:].mean(1)], dim=-1)
    out = enc.embed(tiles)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    assert torch.cdist(out, out).max() > 1e-3  # distinct tissue gives distinct features
    if p.output == "cls+mean":  # the mean half is not the CLS half
        assert not torch.allclose(out[:, :p.embed_dim // 2], out[:, p.embed_dim // 2:])


@pytest.mark.parametrize("name", ["phikon", "hibou-b", "midnight-12k"])
def test_output_rule_of_transformers_presets(name, data_dir):
    p = get_preset(name)
    enc = create_encoder(name, random_weights=True, model_kwargs=D1, device="cpu")
    tiles = _tiles(data_dir, size=p.tile_size)
    with torch.inference_mode():
        res = enc.model.trunk(pixel_values=_reference_input(tiles, p))
        h = res.last_hidden_state
        ref = {"phikon": h[:, 0], "hibou-b": res.pooler_output,
               "midnight-12k": torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1)}[name]
    if name == "hibou-b":  # Dinov2's pooler is the normalised CLS token
        torch.testing.assert_close(res.pooler_output, h[:, 0])
    torch.testing.assert_close(enc.embed(tiles), ref, atol=2e-4, rtol=1e-4)


def test_fingerprints_depend_on_architecture_and_weights():
    a = create_encoder("virchow2", random_weights=True, model_kwargs=D1, device="cpu")
    b = create_encoder("virchow2", random_weights=True, model_kwargs=D1, device="cpu")
    c = create_encoder("virchow", random_weights=True, model_kwargs=D1, device="cpu")
    d = create_encoder("virchow2", random_weights=True, model_kwargs={"depth": 2}, device="cpu")
    assert a.fingerprint == b.fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3
    assert a.spec["model_kwargs"] == D1 and a.spec["random_weights"] is True


def test_preset_options_are_validated():
    from wsi_ssl.errors import ConfigError

    with pytest.raises(ConfigError, match="published preprocessing"):
        create_encoder("uni", random_weights=True, input_size=256)
    with pytest.raises(ConfigError, match="not both"):
        create_encoder("uni", random_weights=True, weights="x.bin")
    with pytest.raises(ConfigError, match="for foundation-model presets"):
        create_encoder("tiny-cnn", model_kwargs=D1)
    with pytest.raises(ConfigError, match=r"unknown encoder 'virchw2'.*virchow2"):
        create_encoder("virchw2")
