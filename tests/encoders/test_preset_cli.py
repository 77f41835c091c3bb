"""Presets end to end: ``wsi-ssl encoders``, a real slide through ``wsi-ssl embed`` with a
depth-reduced ViT preset on a dask LocalCluster, and one real-size ViT-L forward on the CPU."""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import pytest
import torch

from tests._synthetic import tissue_image
from wsi_ssl.cli import main
from wsi_ssl.encoders import create_encoder, get_preset, spec_fingerprint
from wsi_ssl.encoders._presets import _BY_NAME, _USER, build_trunk, register_preset
from wsi_ssl.store import TileStore


def test_cli_encoders_lists_presets_and_finds_local_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    folder = tmp_path / "models" / "Virchow2"
    folder.mkdir(parents=True)
    (folder / "pytorch_model.bin").write_bytes(b"x")
    assert main(["encoders", "--search", str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    for name in ["uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1", "h0-mini",
                 "prov-gigapath", "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8",
                 "kaiko-vitl14"]:
        assert name in rows
    assert rows["uni"].split()[1:6] == ["1024", "0.5", "256", "224", "303.4"]
    assert "1.13 B" in rows["prov-gigapath"] and "CC-BY-NC-ND-4.0" in rows["virchow2"]
    assert str(folder) in rows["virchow2"]
    assert "not found: huggingface-cli download paige-ai/Virchow" in rows["virchow"]
    assert main(["encoders", "kaiko-*"]) == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]} == {
        "kaiko-vits16", "kaiko-vits8", "kaiko-vitb16", "kaiko-vitb8", "kaiko-vitl14"}


@pytest.fixture()
def uni_depth1(tmp_path):
    """A user preset: UNI with one block (registered in this process only), and its weights
    in a hub-style folder."""
    uni = get_preset("uni")
    preset = register_preset(dataclasses.replace(uni, name="test-uni-depth1", aliases=(),
                                                 kwargs={**uni.kwargs, "depth": 1}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        sd = build_trunk(preset).state_dict()
    folder = tmp_path / "UNI-depth1"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    yield preset, folder
    _USER.pop(preset.name, None)
    _BY_NAME.pop(preset.name, None)


def test_embed_a_real_slide_with_a_depth_reduced_vit_preset(uni_depth1, slides_dir, tmp_path,
                                                           capsys):
    from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

    preset, folder = uni_depth1
    slide = slides_dir / "cmu-1-small-region.svs"
    store = tmp_path / "uni.zarr"
    rc = main(["embed", str(slide), "--store", str(store), "--encoder", preset.name,
               "--weights", str(folder), "--mpp", "0.5", "--tile-size", "256",
               "--workers", "1", "--batch-size", "16"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ts = TileStore(store, mode="r")
    rec = ts[ts.slide_ids[0]]
    assert rec.features.shape[1] == 1024 and len(rec.features) >= 10
    # the worker rebuilt the same encoder from its spec: same features as here, tile by tile
    enc = create_encoder(preset.name, weights=folder, device="cpu")
    assert ts.encoder_fingerprint == spec_fingerprint(enc.spec)  # spec + the weights' bytes
    with open_slide(slide) as s:
        grid = tile_grid(s, mpp=0.5, tile_size=256)
        tiles, idx = next(iter(read_tiles(s, grid, batch_size=8)))
    want = enc.embed(tiles).numpy()
    row = {tuple(c): i for i, c in enumerate(rec.coords)}
    got = np.stack([rec.features[row[tuple(grid.coords[j])]] for j in idx]).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_embed_takes_mpp_and_tile_size_from_the_preset_unless_given(uni_depth1, tmp_path,
                                                                   caplog, monkeypatch):
    """``--encoder`` a preset without ``--mpp`` / ``--tile-size``: the preset's resolution and
    tile size (here 1.0 µm/px, 128 px: not the 0.5 / 224 fallbacks), logged and recorded."""

    from wsi_ssl.datasets import write_pyramidal_tiff

    preset, folder = uni_depth1
    moved = register_preset(dataclasses.replace(preset, mpp=1.0, tile_size=128), overwrite=True)
    slide = write_pyramidal_tiff(tmp_path / "s.svs", tissue_image(1024, 768, seed=5), mpp=0.5,
                                 n_levels=1)
    store = tmp_path / "p.zarr"
    with caplog.at_level(logging.INFO, logger="wsi_ssl.tiling"):
        rc = main(["embed", str(slide), "--store", str(store), "--encoder", moved.name,
                   "--weights", str(folder), "--batch-size", "16", "--scheduler", "sync"])
    assert rc == 0
    # logged by the resolver shared with `wsi-ssl tile --encoder` (tiling.grid_settings)
    assert ("mpp=1.0 µm/px and tile_size=128 px from the 'test-uni-depth1' "
            "preset") in caplog.text
    a = TileStore(store, mode="r")["s"].attrs
    assert (a["mpp"], a["tile_size"], a["tile_size_level0"]) == (1.0, 128, 256)
    assert a["embed_settings"]["settings_from_preset"] == "test-uni-depth1"
    rc = main(["embed", str(slide), "--store", str(tmp_path / "q.zarr"), "--encoder", moved.name,
               "--weights", str(folder), "--tile-size", "96", "--scheduler", "sync"])
    a = TileStore(tmp_path / "q.zarr", mode="r")["s"].attrs
    assert rc == 0 and (a["mpp"], a["tile_size"]) == (1.0, 96)  # given wins, per setting


@pytest.mark.slow
def test_real_size_vit_l_forward_on_the_cpu(data_dir, caplog):
    """The UNI architecture at full size (303 M parameters), two real tiles, on the CPU."""
    from PIL import Image

    files = sorted((data_dir / "tiles" / "nct_crc_he_100k").glob("*"))[:2]
    tiles = np.stack([np.asarray(Image.open(f).convert("RGB").resize((256, 256)))
                      for f in files])
    enc = create_encoder("uni", random_weights=True, device="cpu")
    assert sum(p.numel() for p in enc.parameters()) == 303_350_784
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="wsi_ssl.encoders._encoder"):
        out = enc.embed(tiles)
    seconds = time.perf_counter() - t0
    assert out.shape == (2, 1024) and torch.isfinite(out).all()
    assert torch.cdist(out, out).max() > 1e-3
    assert "uni on the CPU:" in caplog.text and "tiles/s measured on 2 tiles" in caplog.text
    logging.getLogger(__name__).info("ViT-L/16 forward of 2 tiles on the CPU: %.1f s", seconds)
