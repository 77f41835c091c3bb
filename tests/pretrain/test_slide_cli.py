"""``wsi-ssl pretrain-slides`` and ``wsi-ssl encode-slides`` on a real zarr tile store."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.cli import main
from wsi_ssl.store import TileStore, load_embeddings

DIM = 16


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cli") / "store.zarr"
    store = TileStore(path, mode="a")
    store.bind_encoder("synthetic-enc", "fp-synthetic-enc", DIM)
    for i in range(10):
        f = rng.normal(size=(30, DIM)) + i % 2
        xy = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 256
        vi = np.stack([rng.choice(30, 12, replace=False) for _ in range(3)])
        store.write_slide(f"s{i}", f, xy, views=f[vi] + 0.1 * rng.normal(size=(3, 12, DIM)),
                          view_index=vi)
    store.write_slide("empty", np.zeros((0, DIM)), np.zeros((0, 2)))
    return path


def test_pretrain_then_encode(store_path, tmp_path, capsys):
    model_dir = tmp_path / "model"
    with pytest.warns(UserWarning, match="without tiles: \\['empty'\\]"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--head",
                   "abmil", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--embed-dim",
                   "32", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "views/s" in out and "empty" in out  # summary table and the skipped slide
    for name in ("model.safetensors", "config.json", "loss_curve.png", "checkpoint.safetensors"):
        assert (model_dir / name).is_file(), name
    # --resume on a finished run trains nothing more and keeps the model
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--head",
                   "abmil", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--embed-dim",
                   "32", "--device", "cpu", "--resume"])
    assert rc == 0
    capsys.readouterr()
    npz = tmp_path / "slides.npz"
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["encode-slides", str(store_path), "--model", str(model_dir), "--out",
                   str(npz)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "bytes/slide" in out and " 64 " in out  # 32 float16 values per slide
    emb = load_embeddings(npz)
    assert emb.embeddings.shape == (10, 32) and "empty" not in emb.slide_ids
    assert emb.embeddings.dtype == np.float16


def test_errors_are_one_line(store_path, tmp_path, capsys):
    rc = main(["encode-slides", str(store_path), "--model", str(tmp_path), "--out",
               str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 1 and "not a SlideSSL model directory" in err
    rc = main(["pretrain-slides", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert rc == 1 and "does not exist" in err


def test_head_options_reach_the_head(store_path, tmp_path, capsys):
    model_dir = tmp_path / "model"
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--epochs", "2",
                   "--batch-size", "4", "--lr", "1e-3", "--embed-dim", "16", "--device", "cpu",
                   "--head-option", "pooling=mean", "--head-option", "n_layers=2"])
    assert rc == 0, capsys.readouterr().err
    from wsi_ssl.pretrain import SlideSSL

    model = SlideSSL.load(model_dir)
    assert model.head_kwargs == {"pooling": "mean", "n_layers": 2}
    assert model.net_.head.pooling == "mean" and len(model.net_.head.convs) == 2
    with pytest.raises(SystemExit):
        main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--head-option", "x"])
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(tmp_path / "m2"), "--epochs",
                   "1", "--device", "cpu", "--head-option", "pooling=sum"])
    assert rc == 1 and "pooling" in capsys.readouterr().err
