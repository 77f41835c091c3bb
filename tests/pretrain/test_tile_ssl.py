"""End-to-end tile SSL on a real slide: weights that load as a tile encoder, checkpoints,
resume after SIGKILL, clear errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._helpers import wait_for_line
from wsi_ssl.encoders import create_encoder
from wsi_ssl.errors import CheckpointError, ConfigError, InputError
from wsi_ssl.pretrain import TileSSLConfig, pretrain_tile_encoder
from wsi_ssl.tiling import open_slide, read_tiles, tile_grid

pytestmark = pytest.mark.usefixtures("single_thread_torch")

TINY = dict(arch="tiny-cnn", tile_size=32, mpp=1.0, tiles_per_epoch=32, batch_size=8,
            hidden_dim=32, num_workers=0, device="cpu", seed=0)


@pytest.fixture(scope="module")
def cmu(slides_dir: Path) -> Path:
    return slides_dir / "cmu-1-small-region.svs"


def _tiles(cmu: Path, n: int = 16) -> np.ndarray:
    with open_slide(cmu) as s:
        grid = tile_grid(s, mpp=1.0, tile_size=32)
        return next(iter(read_tiles(s, grid, batch_size=n, indices=np.arange(n),
                                    read_threads=1))).tiles


def test_resnet18_weights_load_as_tile_encoder(cmu, tmp_path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "r18.safetensors"
    res = pretrain_tile_encoder([cmu], arch="resnet18", tile_size=32, mpp=1.0, epochs=1,
                                tiles_per_epoch=8, batch_size=8, hidden_dim=32, num_workers=0,
                                out=out, device="cpu")
    assert res.weights == out and out.is_file() and res.epochs_done == 1
    assert np.isfinite(res.losses).all()
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "wsi-ssl-tile-encoder" and meta["arch"] == "resnet18"
    # the tensors are exactly a timm num_classes=0 state dict
    ref = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sd = load_file(str(out))
    assert set(sd) == set(ref.state_dict())
    ref.load_state_dict(sd, strict=True)
    # ... and the encoders package loads them (both spellings)
    enc = create_encoder("resnet18", weights=out, device="cpu")
    enc2 = create_encoder(str(out), device="cpu")
    rand = create_encoder("resnet18", device="cpu", random_weights=True)
    assert enc.fingerprint == enc2.fingerprint != rand.fingerprint
    # the encoder expects the tile size it was pretrained at (from the checkpoint metadata)
    assert enc.input_size == enc2.input_size == 32 and rand.input_size == 224
    tiles = _tiles(cmu, 4)
    f = enc.embed(tiles)
    assert f.shape == (4, 512) and torch.isfinite(f).all()
    assert not torch.allclose(f, rand.embed(tiles))
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["config"]["arch"] == "resnet18" and len(info["losses"]) == 1


def test_byol_trains_and_resumes_when_done(cmu, tmp_path):
    out = tmp_path / "byol.safetensors"
    res = pretrain_tile_encoder([cmu], method="byol", epochs=2, out=out, **TINY)
    assert res.epochs_done == 2 and res.resumed_from == 0 and res.tiles_per_s > 0
    assert sorted(p.name for p in res.checkpoint_dir.iterdir()) == ["epoch-0001", "epoch-0002"]
    enc = create_encoder("tiny-cnn", weights=out, device="cpu")
    assert enc.embed(_tiles(cmu, 4)).shape == (4, 64)
    again = pretrain_tile_encoder([cmu], method="byol", epochs=2, out=out, **TINY)
    assert again.resumed_from == 2 and again.losses == res.losses
    more = pretrain_tile_encoder([cmu], method="byol", epochs=3, out=out, **TINY)
    assert more.resumed_from == 2 and more.epochs_done == 3 and more.losses[:2] == res.losses
    with pytest.raises(CheckpointError, match=r"other settings \(batch_size: 8 -> 16"):
        pretrain_tile_encoder([cmu], method="byol", epochs=3, out=out,
                              **(TINY | {"batch_size": 16}))
    fresh = pretrain_tile_encoder([cmu], method="byol", epochs=2, out=out, resume=False, **TINY)
    assert fresh.resumed_from == 0 and fresh.losses == pytest.approx(res.losses, rel=1e-6)
    assert not (res.checkpoint_dir / "epoch-0003").exists()


_KILLED_RUN = """
import sys, time, torch
torch.set_num_threads(1)
from wsi_ssl.pretrain import pretrain_tile_encoder
def cb(epoch, step, loss):
    if epoch == 2 and step == 2:          # mid-way through epoch 2, after checkpoint 1
        print("IN-EPOCH-2", flush=True)
        time.sleep(600)                   # not synchronisation: stands in for the rest of the
                                          # epoch; the test kills us here
pretrain_tile_encoder([sys.argv[1]], epochs=3, out=sys.argv[2], callback=cb, **{kw})
"""


def test_sigkill_mid_epoch_then_resume(cmu, tmp_path):
    out = tmp_path / "enc.safetensors"
    script = textwrap.dedent(_KILLED_RUN).replace("{kw}", repr(TINY))
    proc = subprocess.Popen([sys.executable, "-c", script, str(cmu), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "IN-EPOCH-2", timeout=240)  # training exited early or hung: fails
    finally:
        proc.kill()  # SIGKILL
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt = out.with_name("enc.ckpt")
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.startswith(".")) == ["epoch-0001"]
    assert json.loads(out.with_suffix(".json").read_text())["epoch"] == 1

    resumed = pretrain_tile_encoder([cmu], epochs=3, out=out, **TINY)
    assert resumed.resumed_from == 1 and resumed.epochs_done == 3 and len(resumed.losses) == 3
    assert (ckpt / "epoch-0003").is_dir()

    # the interrupted + resumed run ends where an uninterrupted run ends
    straight = pretrain_tile_encoder([cmu], epochs=3, out=tmp_path / "ref.safetensors", **TINY)
    np.testing.assert_allclose(resumed.losses, straight.losses, rtol=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(str(out)), load_file(str(tmp_path / "ref.safetensors"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_bad_arguments(cmu, tmp_path):
    with pytest.raises(ConfigError, match="method='moco'.*simclr"):
        pretrain_tile_encoder([cmu], method="moco", out=tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match=r"out='.*x.pt' must end in .safetensors"):
        pretrain_tile_encoder([cmu], out=tmp_path / "x.pt", num_workers=0)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['temprature'\]"):
        pretrain_tile_encoder([cmu], temprature=0.1, out=tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="epochs=0"):
        pretrain_tile_encoder([cmu], epochs=0, out=tmp_path / "x.safetensors")

    with pytest.raises(InputError, match="nope.svs"):
        pretrain_tile_encoder([tmp_path / "nope.svs"], out=tmp_path / "x.safetensors")


def test_takes_its_config_and_refuses_pickled_checkpoints(cmu, tmp_path):
    """The run is a TileSSLConfig (keyword overrides validated the same way); an epoch directory
    with a pickled ``state.pt`` (older versions) is never unpickled: a clear CheckpointError."""
    cfg = TileSSLConfig(**{**TINY, "epochs": 1, "tiles_per_epoch": 8})
    assert cfg.augment == TileSSLConfig(augment="histo").augment  # stored as the preset's fields
    with pytest.raises(ConfigError, match="batch_size=1"):
        pretrain_tile_encoder([cmu], cfg, batch_size=1, out=tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="TileSSLConfig"):
        pretrain_tile_encoder([cmu], {"epochs": 1}, out=tmp_path / "x.safetensors")
    old = tmp_path / "enc.ckpt" / "epoch-0001"
    old.mkdir(parents=True)
    (old / "method.safetensors").write_bytes(b"")
    (old / "state.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match=r"pickled state.pt.*--no-resume"):
        pretrain_tile_encoder([cmu], cfg, out=tmp_path / "enc.safetensors")
    res = pretrain_tile_encoder([cmu], cfg, out=tmp_path / "enc.safetensors", resume=False)
    assert res.config == cfg and res.epochs_done == 1
    assert sorted(p.name for p in (tmp_path / "enc.ckpt" / "epoch-0001").iterdir()) == [
        "method.safetensors", "state.safetensors"]
