"""Slide encoders on real zarr tile stores: compatibility refused in one line (tile encoder,
µm/px, embedding dimension) with the ``wsi-ssl embed`` command that fixes it, ``--force``
recorded in the output, the same SlideEmbeddings file as slide SSL, TITAN's grid from the
stored ``stride_level0`` (a 20x and a 40x scan of the same tissue embed identically), and the
``encode-slides --slide-encoder`` command."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_ssl.cli import main
from wsi_ssl.encoders import create_slide_encoder
from wsi_ssl.encoders.slide import encode_store
from wsi_ssl.errors import EncoderMismatchError, InputError
from wsi_ssl.store import TileStore, load_embeddings

CELLS = np.array([(x, y) for x in range(6) for y in range(4) if (x + 2 * y) % 5])


def _store(path, encoder: str, dim: int, *, mpp: float = 0.5, tile: int = 512,
           strides=(512.0, 1024.0, 512.0), stride_attr: bool = True) -> TileStore:
    store = TileStore(path, mode="w")
    store.bind_encoder(encoder, "f" * 16, dim)
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(len(CELLS), dim)).astype(np.float16)
    for i, stride in enumerate(strides):
        attrs = {"mpp": mpp, "tile_size": tile, "overlap": 0, "slide_mpp": 0.25 if stride > 600
                 else 0.5}
        if stride_attr:
            attrs["stride_level0"] = stride
        f = feats if i < 2 else rng.normal(size=feats.shape).astype(np.float16)
        store.write_slide(f"s{i}", f, CELLS * int(stride) + 100 * i, attrs=attrs)
    return store


def test_titan_on_a_store_20x_and_40x_scans_embed_identically(tmp_path):
    store = _store(tmp_path / "conch.zarr", "conch-v1.5", 768)
    enc = create_slide_encoder("titan", random_weights=True, device="cpu",
                               model_kwargs={"depth": 1})
    res = encode_store(store, enc, out=tmp_path / "titan.npz")
    emb = load_embeddings(res.path)
    assert emb.slide_ids == ("s0", "s1", "s2") and emb.dim == 768
    np.testing.assert_array_equal(emb.embeddings[0], emb.embeddings[1])  # 20x == 40x
    assert not np.allclose(emb.embeddings[0], emb.embeddings[2])
    prov = emb.provenance
    assert prov["slide_encoder"]["name"] == "titan" and prov["slide_encoder"]["random_weights"]
    assert "RANDOM weights" in prov["method"] and prov["warnings"] == []
    assert prov["tile_encoder"]["name"] == "conch-v1.5"


def test_wrong_tiles_are_refused_in_one_line_and_force_is_recorded(tmp_path):
    uni = _store(tmp_path / "uni.zarr", "uni", 1024, tile=256)
    with pytest.raises(EncoderMismatchError) as info:
        encode_store(uni, "titan", random_weights=True, device="cpu")
    msg = str(info.value)
    assert "holds 'uni' tiles (1024-d, 0.5 µm/px, 256 px); slide encoder 'titan' needs " \
           "'conch-v1.5' tiles (768-d, 0.5 µm/px, 512 px)" in msg
    assert "`wsi-ssl embed SLIDES/ --store NEW.zarr --encoder conch-v1.5 --mpp 0.5 " \
           "--tile-size 512`" in msg and "--force cannot help" in msg and "\n" not in msg
    with pytest.raises(EncoderMismatchError, match="--force cannot help"):
        encode_store(uni, "titan", random_weights=True, device="cpu", force=True)

    kaiko = _store(tmp_path / "kaiko.zarr", "kaiko-vitb16", 768, tile=256)  # same dimension
    with pytest.raises(EncoderMismatchError, match=r"tile encoder 'kaiko-vitb16' instead of "
                       r"'conch-v1.5'; slide 's0' and 2 more has 256 px tiles instead of 512\)"
                       r": make them with `wsi-ssl embed .*--encoder conch-v1\.5.*`.*--force"):
        encode_store(kaiko, "feather", random_weights=True, device="cpu")

    low = _store(tmp_path / "mpp.zarr", "conch-v1.5", 768, mpp=0.25)
    with pytest.raises(EncoderMismatchError, match=r"slide 's0' and 2 more tiled at 0\.25 µm/px "
                       r"instead of 0\.5"):
        encode_store(low, "feather", random_weights=True, device="cpu")
    res = encode_store(low, "feather", random_weights=True, device="cpu", force=True,
                       out=tmp_path / "forced.npz")
    prov = load_embeddings(res.path).provenance
    assert prov["forced"] is True and len(prov["warnings"]) == 1
    assert "forced: slide 's0' and 2 more tiled at 0.25 µm/px" in prov["warnings"][0]

    flat = _store(tmp_path / "nostride.zarr", "conch-v1.5", 768, stride_attr=False)
    with pytest.raises(InputError, match=r"slide 's0' has no stride_level0 attribute.*never a "
                       r"guessed patch size"):
        encode_store(flat, "titan", random_weights=True, device="cpu")
    assert len(encode_store(flat, "feather", random_weights=True, device="cpu").embeddings) == 3


def test_feather_batches_equal_one_slide_at_a_time(tmp_path):
    store = _store(tmp_path / "c.zarr", "conch-v1.5", 768)
    enc = create_slide_encoder("feather", random_weights=True, device="cpu")
    a = encode_store(store, enc, batch_size=3).embeddings.embeddings
    b = encode_store(store, enc, batch_size=1).embeddings.embeddings
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_encode_slides_cli(tmp_path, capsys):
    _store(tmp_path / "c.zarr", "conch-v1.5", 768)
    out = tmp_path / "feather.npz"
    rc = main(["encode-slides", str(tmp_path / "c.zarr"), "--slide-encoder", "feather",
               "--random-weights", "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "RANDOM weights" in text and "embeddings written to" in text
    emb = load_embeddings(out)
    assert emb.embeddings.shape == (3, 512) and emb.provenance["slide_encoder"]["name"] == \
        "feather"
    _store(tmp_path / "u.zarr", "uni", 1024, tile=256)
    rc = main(["encode-slides", str(tmp_path / "u.zarr"), "--slide-encoder", "feather",
               "--random-weights", "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 1 and "needs 'conch-v1.5' tiles" in err and len(err.strip().splitlines()) == 1
    rc = main(["encode-slides", str(tmp_path / "c.zarr"), "--slide-encoder", "titan",
               "--out", str(tmp_path / "y.npz"), "--weights", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 1 and "do not exist" in err and "huggingface-cli download MahmoodLab/TITAN" in err
    with pytest.raises(SystemExit):
        main(["encode-slides", str(tmp_path / "c.zarr"), "--out", str(out)])  # neither given
