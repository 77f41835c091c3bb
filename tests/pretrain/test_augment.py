"""Histology augmentations on real H&E tiles (NCT-CRC-HE-100K)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsi_ssl import augment as A
from wsi_ssl.errors import ConfigError, InputError

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def he_tiles(data_dir: Path) -> torch.Tensor:
    files = sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*.tif"))
    files += sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*.png"))
    files += sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*.jpg"))
    assert len(files) >= 4, files
    arr = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224))) for f in files[:6]])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # uint8 (B, 3, 224, 224)


def test_presets_and_validation():
    assert A.get_augment_config("histo") == A.AugmentConfig()
    none = A.get_augment_config("none")
    assert none.crop_scale == (1.0, 1.0) and none.hflip == 0
    assert A.get_augment_config({"hflip": 0.1}).hflip == 0.1
    with pytest.raises(ConfigError, match="augment='heavy'.*histo"):
        A.get_augment_config("heavy")
    with pytest.raises(ConfigError, match="hflip=1.5.*probability"):
        A.AugmentConfig(hflip=1.5)
    with pytest.raises(ConfigError, match="crop_scale"):
        A.AugmentConfig(crop_scale=(0.9, 0.2))
    with pytest.raises(ConfigError, match="unknown AugmentConfig fields"):
        A.get_augment_config({"flipp": 1})


def test_shapes_dtype_range(he_tiles):
    rng = np.random.default_rng(0)
    out = A.random_augment(he_tiles, rng, "histo", out_size=96)
    assert out.shape == (he_tiles.shape[0], 3, 96, 96) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # float input in [0, 1] is accepted as well, and numpy too
    out2 = A.apply_params(he_tiles.float() / 255, A.sample_params(rng), out_size=64)
    assert out2.shape == (he_tiles.shape[0], 3, 64, 64)
    out3 = A.apply_params(he_tiles.numpy(), A.AugmentParams(), out_size=32)
    assert out3.shape[-1] == 32


def test_identity_params_is_resize(he_tiles):
    out = A.apply_params(he_tiles, A.AugmentParams(), out_size=224)
    ref = he_tiles.float() / 255
    assert torch.allclose(out, ref, atol=1e-4)
    small = A.apply_params(he_tiles, A.AugmentParams(), out_size=112)
    pooled = torch.nn.functional.avg_pool2d(ref, 2)
    assert torch.allclose(small, pooled, atol=1e-4)


def test_seeded_and_deterministic(he_tiles):
    a = A.random_augment(he_tiles, np.random.default_rng(7), "histo", out_size=64)
    b = A.random_augment(he_tiles, np.random.default_rng(7), "histo", out_size=64)
    c = A.random_augment(he_tiles, np.random.default_rng(8), "histo", out_size=64)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert A.sample_params(np.random.default_rng(3)) == A.sample_params(np.random.default_rng(3))


def test_random_augment_equals_per_tile_apply(he_tiles):
    cfg = A.AugmentConfig(blur_prob=0.7, grayscale=0.3)
    batched = A.random_augment(he_tiles, np.random.default_rng(11), cfg, out_size=80)
    rng = np.random.default_rng(11)
    loop = torch.cat([A.apply_params(he_tiles[i:i + 1], A.sample_params(rng, cfg), out_size=80)
                      for i in range(he_tiles.shape[0])])
    assert torch.allclose(batched, loop, atol=1e-5)
    # independent draws: not all tiles share one transform
    crops = {A.sample_params(rng, cfg).crop for _ in range(5)}
    assert len(crops) == 5


def test_apply_params_same_for_every_tile(he_tiles):
    x = he_tiles[:1].repeat(4, 1, 1, 1)
    p = A.sample_params(np.random.default_rng(5))
    out = A.apply_params(x, p, out_size=64)
    assert torch.allclose(out[0], out[3], atol=1e-6)


def test_flips_and_rotations_exact(he_tiles):
    ref = A.apply_params(he_tiles, A.AugmentParams(), out_size=224)
    h = A.apply_params(he_tiles, A.AugmentParams(hflip=True), out_size=224)
    assert torch.allclose(h, ref.flip(-1), atol=1e-6)
    v = A.apply_params(he_tiles, A.AugmentParams(vflip=True), out_size=224)
    assert torch.allclose(v, ref.flip(-2), atol=1e-6)
    r = A.apply_params(he_tiles, A.AugmentParams(rot90=1), out_size=224)
    assert torch.allclose(r, torch.rot90(ref, 1, dims=(-2, -1)), atol=1e-6)


def test_crop_takes_the_right_region(he_tiles):
    p = A.AugmentParams(crop=(0.5, 0.25, 0.5, 0.5))
    out = A.apply_params(he_tiles, p, out_size=112)
    ref = he_tiles.float()[:, :, 56:168, 112:224] / 255
    assert torch.allclose(out, ref, atol=1e-4)


def test_hed_jitter_moves_stains_the_right_way(he_tiles):
    from skimage.color import rgb2hed

    x = he_tiles[:4]
    ident = A.apply_params(x, A.AugmentParams(hed_scale=(1, 1, 1), hed_shift=(0, 0, 0)),
                           out_size=224)
    assert torch.allclose(ident, x.float() / 255, atol=1e-4)
    more_h = A.apply_params(x, A.AugmentParams(hed_scale=(1.3, 1.0, 1.0)), out_size=224)
    base = rgb2hed(x.permute(0, 2, 3, 1).numpy())
    jit = rgb2hed((more_h.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
    # more haematoxylin, eosin unchanged (up to 8-bit rounding)
    assert jit[..., 0].mean() > base[..., 0].mean() * 1.1
    assert abs(jit[..., 1].mean() - base[..., 1].mean()) < 0.05 * abs(base[..., 1]).mean() + 1e-3


def test_color_jitter_and_grayscale(he_tiles):
    x = he_tiles[:4]
    ref = A.apply_params(x, A.AugmentParams(), out_size=64)
    bright = A.apply_params(x, A.AugmentParams(brightness=0.5), out_size=64)
    assert torch.allclose(bright, ref * 0.5, atol=1e-5)
    gray = A.apply_params(x, A.AugmentParams(grayscale=True), out_size=64)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    desat = A.apply_params(x, A.AugmentParams(saturation=0.0), out_size=64)
    assert torch.allclose(desat, gray, atol=1e-5)
    hue = A.apply_params(x, A.AugmentParams(hue=0.25), out_size=64)
    assert (hue - ref).abs().mean() > 0.02
    flat = A.apply_params(x, A.AugmentParams(contrast=0.0), out_size=64)
    assert float(flat.std(dim=(2, 3)).max()) < 1e-3 < float(ref.std(dim=(2, 3)).max())


def test_blur_smooths(he_tiles):
    x = he_tiles[:2]
    ref = A.apply_params(x, A.AugmentParams(), out_size=96)
    blur = A.apply_params(x, A.AugmentParams(blur_sigma=2.0), out_size=96)
    grad = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert grad(blur) < 0.6 * grad(ref)
    assert torch.allclose(blur.mean(dim=(2, 3)), ref.mean(dim=(2, 3)), atol=0.02)


def test_bad_input_messages(he_tiles):
    with pytest.raises(InputError, match=r"channels-last"):
        A.apply_params(he_tiles.permute(0, 2, 3, 1), A.AugmentParams(), out_size=64)
    with pytest.raises(InputError, match="uint8 or float"):
        A.apply_params(he_tiles.to(torch.int32), A.AugmentParams(), out_size=64)
    with pytest.raises(ConfigError, match="out_size=4"):
        A.random_augment(he_tiles, np.random.default_rng(0), out_size=4)
    with pytest.raises(ConfigError, match="numpy.random.Generator"):
        A.sample_params(0)  # type: ignore[arg-type]
