"""``wsi-ssl pretrain-tiles`` end to end (tiny model, one epoch)."""

from __future__ import annotations

import pytest

from wsi_ssl.cli import main

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def test_cli_pretrain_tiles(slides_dir, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    args = [str(slides_dir / "cmu-1-small-region.svs"), "--out", str(out), "--arch", "tiny-cnn",
            "--epochs", "1", "--tiles-per-epoch", "16", "--tile-size", "32", "--mpp", "1.0",
            "--batch-size", "8", "--num-workers", "0", "--device", "cpu"]
    assert main(["pretrain-tiles", *args]) == 0
    text = capsys.readouterr().out
    assert "weights:" in text and str(out) in text and "tiles/s" in text
    assert out.is_file()
    # rerun: resumes (nothing left to do) and says so
    assert main(["pretrain-tiles", *args]) == 0
    assert "(resumed)" in capsys.readouterr().out


def test_cli_pretrain_tiles_bad_value(slides_dir, tmp_path, capsys):
    code = main(["pretrain-tiles", str(slides_dir / "cmu-1-small-region.svs"),
                 "--out", str(tmp_path / "e.safetensors"), "--method", "simclr",
                 "--batch-size", "1", "--num-workers", "0"])
    assert code == 1
    assert "TileSSLConfig(batch_size=1) must be an integer >= 2" in capsys.readouterr().err
