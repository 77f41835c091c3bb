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
    # SlideSSL resolves the auto settings in fit and says what it chose and why, before
    # training; the explicit flags win over them
    assert "overridden by flags: batch_size=4, epochs=3, lr=0.001" in out
    assert ("SlideSSL settings: tiles_per_view=12 (auto) batch_size=4 (given) epochs=3 (given) "
            "lr=0.001 (given) temperature=0.1 (auto). auto: 10 slides") in out
    assert "capped at the bank's 12 tiles" in out
    assert out.index("SlideSSL settings:") < out.index("first loss")
    assert _table_row(out)[2] == 3  # epochs trained
    from wsi_ssl.pretrain import SlideSSL

    trained = SlideSSL.load(model_dir)
    assert (trained.tiles_per_view, trained.temperature, trained.epochs) == ("auto", "auto", 3)
    assert (trained.tiles_per_view_, trained.epochs_, trained.temperature_) == (12, 3, 0.1)
    assert "capped at the bank's 12 tiles" in trained.settings_reason_
    files = ("model.safetensors", "config.json", "loss_curve.png", "checkpoint.safetensors")
    for name in files:
        assert (model_dir / name).is_file(), name
    before = {n: (model_dir / n).read_bytes() for n in ("model.safetensors",
                                                        "checkpoint.safetensors")}
    # --resume on a finished run trains nothing more and keeps the model
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--head",
                   "abmil", "--epochs", "3", "--batch-size", "4", "--lr", "1e-3", "--embed-dim",
                   "32", "--device", "cpu", "--resume"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert _table_row(out)[2] == 3  # the history still holds the 3 epochs, no 4th
    for name, data in before.items():
        assert (model_dir / name).read_bytes() == data, f"{name} changed on --resume"
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


def _table_row(out: str) -> list[float]:
    """The numbers of the summary row under the ``slides skipped epochs ...`` header."""
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split()[:3] == ["slides", "skipped",
                                                                        "epochs"])
    return [float(v) for v in lines[i + 1].split()]


def test_paper_preset_is_giga_ssl_exactly(store_path, tmp_path, capsys):
    model_dir = tmp_path / "paper"
    with pytest.warns(UserWarning, match="empty"):
        rc = main(["pretrain-slides", str(store_path), "--out", str(model_dir), "--preset",
                   "paper", "--epochs", "1", "--embed-dim", "16", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "preset paper: tiles_per_view=5 batch_size=256 epochs=3000 lr=0.03 " \
           "temperature=0.05" in out and "overridden by flags: epochs=1" in out
    assert "SlideSSL settings: tiles_per_view=5 (given) batch_size=10 (given)" in out
    from wsi_ssl.pretrain import SlideSSL

    m = SlideSSL.load(model_dir)
    assert (m.tiles_per_view, m.batch_size, m.epochs, m.lr, m.temperature) == \
        (5, 256, 1, 0.03, 0.05)
    assert m.batch_size_ == 10 and m.settings_reason_ == ""  # clamped to the 10 slides


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
