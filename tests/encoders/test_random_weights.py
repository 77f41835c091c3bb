"""No silent random weights (issue 22 §6): ``wsi-ssl embed`` refuses an encoder without built-in
weights unless given ``--weights`` or ``--random-weights``; the choice is recorded in the store
and shown by ``wsi-ssl info``; the Python API warns once per process per model name."""

from __future__ import annotations

import warnings

import pytest
import torch

import wsi_ssl.encoders._registry as registry
from wsi_ssl.cli import main
from wsi_ssl.encoders import create_encoder, has_builtin_weights, weights_kind
from wsi_ssl.errors import RandomWeightsWarning
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import embed_slides

TIMM = "test_resnet"  # a tiny timm architecture: no built-in weights
FAST = ["--scheduler", "sync", "--mpp", "4", "--tile-size", "32", "--batch-size", "64"]


@pytest.fixture()
def fresh_warnings(monkeypatch):
    """Forget which names warned in this process (the warning is once per process)."""
    monkeypatch.setattr(registry, "_WARNED", set())


def _random_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RandomWeightsWarning)]


def test_which_encoders_have_built_in_weights():
    assert not has_builtin_weights(TIMM)
    assert has_builtin_weights("tiny-cnn")  # registered builder
    assert has_builtin_weights("uni")  # a preset: weights from the cache, or an error
    assert has_builtin_weights("ckpt.safetensors")
    assert weights_kind({"name": TIMM, "weights": None}) == "random"
    assert weights_kind({"name": "tiny-cnn", "weights": None}) == "builtin"
    assert weights_kind({"name": TIMM, "weights": "/w.pth"}) == "file"
    assert weights_kind({"name": "uni", "weights": None, "random_weights": True}) == "random"


def test_cli_refuses_an_encoder_without_weights_in_one_line(slides_dir, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    rc = main(["embed", str(slides_dir / "cmu-1-small-region.svs"), "--store", str(store),
               "--encoder", TIMM, *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 1
    assert len(err.splitlines()) == 1
    assert f"encoder '{TIMM}' has no built-in weights" in err
    assert "--weights FILE" in err and "--random-weights" in err
    assert not store.exists()  # refused before anything was made


def test_cli_random_weights_on_purpose_is_recorded_and_shown(slides_dir, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rc = main(["embed", str(slides_dir / "cmu-1-small-region.svs"), "--store", str(store),
                   "--encoder", TIMM, "--random-weights", *FAST])
    assert rc == 0, capsys.readouterr()
    assert _random_warnings(record) == []  # on purpose: no warning
    ts = TileStore(store, mode="r")
    assert ts.encoder["weights"] == "random"
    assert ts.slide_attrs(ts.slide_ids[0])["encoder_weights"] == "random"
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "weights        random initialisation (--random-weights" in out
    # the same rerun skips the slide (same encoder, same fingerprint)
    assert main(["embed", str(slides_dir / "cmu-1-small-region.svs"), "--store", str(store),
                 "--encoder", TIMM, "--random-weights", *FAST]) == 0
    assert "skipped   1 slides" in capsys.readouterr().out


def test_cli_weights_file_is_recorded_as_file(slides_dir, tmp_path, capsys):
    enc = create_encoder(TIMM, random_weights=True, device="cpu")
    weights = tmp_path / "w.pth"
    torch.save(enc.model.state_dict(), weights)
    store = tmp_path / "s.zarr"
    assert main(["embed", str(slides_dir / "cmu-1-small-region.svs"), "--store", str(store),
                 "--encoder", TIMM, "--weights", str(weights), *FAST]) == 0
    assert TileStore(store, mode="r").encoder["weights"] == "file"
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    assert "weights        from a weights file" in capsys.readouterr().out


def test_python_api_warns_exactly_once_per_name(fresh_warnings):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        create_encoder(TIMM, device="cpu")
        create_encoder(TIMM, device="cpu")
        create_encoder(TIMM, device="cpu", random_weights=True)
    msgs = _random_warnings(record)
    assert len(msgs) == 1, msgs
    assert f"encoder '{TIMM}'" in msgs[0] and "random_weights=True" in msgs[0]


def test_python_api_random_weights_true_is_silent(fresh_warnings):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        create_encoder(TIMM, device="cpu", random_weights=True)
        create_encoder("tiny-cnn", device="cpu")  # built-in weights: nothing to say
    assert _random_warnings(record) == []
    with pytest.raises(Exception, match="not both"):
        create_encoder(TIMM, weights="w.pth", random_weights=True)


def test_embed_slides_warns_once_and_records_random(fresh_warnings, slides_dir, tmp_path):
    slide = slides_dir / "cmu-1-small-region.svs"
    kw = {"client": "sync", "mpp": 4.0, "tile_size": 32}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        embed_slides([slide], TIMM, tmp_path / "a.zarr", **kw)
        embed_slides([slide], TIMM, tmp_path / "b.zarr", **kw)
    assert len(_random_warnings(record)) == 1
    assert TileStore(tmp_path / "a.zarr", mode="r").encoder["weights"] == "random"
