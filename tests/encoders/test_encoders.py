"""Tile encoders: the registry, timm names, local weights, fingerprints, preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from wsi_ssl.encoders import (
    TileEncoder,
    create_encoder,
    get_preset,
    list_encoders,
    register_encoder,
)
from wsi_ssl.errors import ConfigError, InputError, WeightsError


def _real_tiles(data_dir, size=64) -> np.ndarray:
    from PIL import Image

    files = sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*"))[:6]
    assert files, "no real tiles found"
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])


@pytest.mark.parametrize("name", [n for n in list_encoders() if get_preset(n) is None])
def test_every_registered_encoder_has_the_contract(name, data_dir):
    # (foundation-model presets need weights: their contract test is in test_presets.py)
    enc = create_encoder(name, device="cpu")
    assert isinstance(enc, TileEncoder) and isinstance(enc, torch.nn.Module)
    assert enc.name == name and enc.embed_dim > 0 and enc.input_size >= 16
    assert len(enc.mean) == 3 and len(enc.std) == 3
    assert isinstance(enc.fingerprint, str) and len(enc.fingerprint) == 16
    assert enc.device.type == "cpu" and enc.dtype == torch.float32
    tiles = _real_tiles(data_dir, enc.input_size)
    out = enc.embed(tiles)
    assert out.shape == (len(tiles), enc.embed_dim) and out.dtype == torch.float32
    assert out.device.type == "cpu" and torch.isfinite(out).all()
    # distinct tissue classes give distinct features
    assert torch.cdist(out, out).max() > 1e-3


def test_same_name_same_weights_same_fingerprint_across_builds():
    a, b = create_encoder("tiny-cnn"), create_encoder("tiny-cnn")
    assert a.fingerprint == b.fingerprint
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert create_encoder("tiny-vit").fingerprint != a.fingerprint
    assert create_encoder("tiny-cnn", input_size=96).fingerprint != a.fingerprint


def test_uint8_and_float_inputs_agree_and_resize(data_dir):
    enc = create_encoder("tiny-cnn", device="cpu")
    tiles = _real_tiles(data_dir, 64)
    from_uint8 = enc.embed(tiles)
    as_float = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(enc.embed(as_float), from_uint8, atol=1e-5, rtol=1e-5)
    # torch uint8 input works too; bigger tiles are resized to input_size
    torch.testing.assert_close(enc.embed(torch.from_numpy(tiles)), from_uint8)
    big = _real_tiles(data_dir, 128)
    assert enc.embed(big).shape == (len(big), enc.embed_dim)
    assert enc.embed(np.zeros((0, 64, 64, 3), np.uint8)).shape == (0, enc.embed_dim)


def test_bad_tiles_are_clear_errors():
    enc = create_encoder("tiny-cnn")
    with pytest.raises(InputError, match=r"uint8 tiles must be \(B, H, W, 3\)"):
        enc.embed(np.zeros((2, 3, 64, 64), np.uint8))
    with pytest.raises(InputError, match="float tiles must be"):
        enc.embed(torch.zeros(2, 64, 64, 3))
    with pytest.raises(InputError, match="dtype"):
        enc.embed(np.zeros((2, 64, 64, 3), np.int32))


def test_unknown_name_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown encoder 'tiny-cnnn'.*tiny-cnn"):
        create_encoder("tiny-cnnn")
    with pytest.raises(ConfigError, match="dtype='float8'"):
        create_encoder("tiny-cnn", dtype="float8")


def test_cuda_asked_for_without_cuda_is_a_config_error(monkeypatch):
    # simulate a machine without CUDA (also on a GPU machine, where this must still fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device='cuda' was asked for but CUDA is not "
                                          r"available on this machine; use device='auto' or 'cpu'"):
        create_encoder("tiny-cnn", device="cuda")
    assert create_encoder("tiny-cnn", device="auto").device.type in ("cpu", "mps")


def test_timm_name_without_download():
    enc = create_encoder("resnet18", device="cpu", random_weights=True)
    assert enc.embed_dim == 512 and enc.input_size == 224
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406))
    assert enc.embed(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, 512)


def test_weights_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    src = create_encoder("tiny-cnn")
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(0.01)
    sd = src.model.state_dict()
    # a training checkpoint: prefixed keys, a classifier head, wrapped in "state_dict"
    ckpt = {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}
            | {"module.backbone.fc.weight": torch.zeros(2, 64)}}
    torch.save(ckpt, tmp_path / "w.pth")
    a = create_encoder("tiny-cnn", weights=tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"),
              metadata={"format": "wsi-ssl-tile-encoder", "arch": "tiny-cnn"})
    b = create_encoder("tiny-cnn", weights=tmp_path / "w.safetensors")
    c = create_encoder(tmp_path / "w.safetensors")  # arch read from the metadata
    assert a.fingerprint == b.fingerprint == c.fingerprint
    assert a.fingerprint != create_encoder("tiny-cnn").fingerprint
    x = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(a.embed(x), b.embed(x))
    with pytest.raises(WeightsError, match="written for arch 'tiny-cnn', not 'tiny-vit'"):
        create_encoder("tiny-vit", weights=tmp_path / "w.safetensors")


def test_mismatched_and_unreadable_weights(tmp_path):
    sd = create_encoder("tiny-cnn").model.state_dict()
    partial = {k: v for k, v in sd.items() if not k.startswith("features.9")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match=r"missing keys \(e\.g\. \['features\.9"):
        create_encoder("tiny-cnn", weights=tmp_path / "partial.pth")
    bad = dict(sd)
    bad["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(bad | {"extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*extra\.weight.*shape mismatches"):
        create_encoder("tiny-cnn", weights=tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights file .*junk.pth"):
        create_encoder("tiny-cnn", weights=tmp_path / "junk.pth")
    with pytest.raises(WeightsError, match="does not exist"):
        create_encoder("tiny-cnn", weights=tmp_path / "missing.pth")


def test_pickle_roundtrip_rebuilds_from_spec():
    enc = create_encoder("tiny-vit")
    blob = pickle.dumps(enc)
    assert len(blob) < 2000  # travels as its spec, not its weights
    back = pickle.loads(blob)
    assert back.fingerprint == enc.fingerprint
    x = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    torch.testing.assert_close(back.embed(x), enc.embed(x))


def test_wrap_any_module_and_register():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    enc = create_encoder(net, input_size=32)
    assert enc.embed_dim == 8 and enc.spec is None
    assert enc.embed(np.zeros((3, 40, 40, 3), np.uint8)).shape == (3, 8)
    back = pickle.loads(pickle.dumps(enc))
    assert back.fingerprint == enc.fingerprint

    @register_encoder("test-wrapped-conv", input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    def _build():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten())

    try:
        assert "test-wrapped-conv" in list_encoders("test-*")
        e2 = create_encoder("test-wrapped-conv")
        assert e2.embed_dim == 4 and e2.mean == (0.5, 0.5, 0.5)
        with pytest.raises(ConfigError, match="already registered"):
            register_encoder("test-wrapped-conv", _build)
    finally:
        from wsi_ssl.encoders._registry import _REGISTRY

        _REGISTRY.pop("test-wrapped-conv", None)
