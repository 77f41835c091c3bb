"""The embedding pipeline around the encoder (issue 15 §2, issue 14's EmbedConfig): where slides
run (in-process vs a local cluster pinned one worker per GPU, chosen and logged), a driver that
never builds the model (spec fingerprints, stores made before them still accepted), the next
slide prepared while the current one is encoded, the store written in a background thread, the
view bank augmented on the encoder's device, and the settings as a validated EmbedConfig."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import wsi_ssl.encoders._loading as loading
import wsi_ssl.encoders._registry as registry
import wsi_ssl.store as store_mod
import wsi_ssl.tiling._cluster as cluster
import wsi_ssl.tiling._embed_worker as worker
from tests._synthetic import tissue_image
from wsi_ssl._utils import file_fingerprint
from wsi_ssl.augment import get_augment_config
from wsi_ssl.datasets import write_pyramidal_tiff
from wsi_ssl.encoders import (
    create_encoder,
    encoder_identity,
    get_preset,
    register_encoder,
    spec_fingerprint,
)
from wsi_ssl.encoders._tiny import TinyCNN
from wsi_ssl.errors import ConfigError, EncoderMismatchError, WeightsError
from wsi_ssl.store import TileStore
from wsi_ssl.tiling import EmbedConfig, SlideFailure, SlideResult, embed_slides, grid_settings
from wsi_ssl.tiling._config import embed_config
from wsi_ssl.tiling._embed_worker import EncoderPayload, run_job

TILE = 64
KW = {"mpp": 0.5, "tile_size": TILE, "batch_size": 32}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("pipeline")
    return [write_pyramidal_tiff(d / f"p{i}.svs", tissue_image(768, 512, seed=40 + i), mpp=0.5,
                                 n_levels=1) for i in range(4)]


def _arrays(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    s = TileStore(path, mode="r")
    return {sid: (s[sid].features, s[sid].coords, s[sid].views, s[sid].view_index)
            for sid in s.slide_ids}


def _no_model_in_this_process(monkeypatch) -> None:
    """Any encoder built in this (the driver's) process fails the test."""
    def boom(*a, **k):
        raise AssertionError("the driver built an encoder model")

    monkeypatch.setattr(registry, "_build", boom)
    monkeypatch.setattr(loading, "build_preset_model", boom)


# --------------------------------------------------------------------------- where slides run


def test_one_slide_runs_in_process_and_says_why(cohort, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="wsi_ssl.tiling._embed"):
        rep = embed_slides(cohort[:1], "tiny-cnn", tmp_path / "one.zarr", **KW)
    assert rep.ok and rep.done == ("p0",)
    assert rep.plan == "in this process: one slide, a local cluster cannot pay off"
    assert f"embed_slides: {rep.plan}" in caplog.text
    assert rep.workers[0][1].startswith(f"{os.uname().nodename} pid={os.getpid()}")


def test_n_workers_starts_a_local_cpu_cluster_that_builds_the_encoder_itself(
        cohort, tmp_path, monkeypatch):
    _no_model_in_this_process(monkeypatch)
    rep = embed_slides(cohort[:2], "tiny-cnn", tmp_path / "cpu.zarr", n_workers=2, **KW)
    assert rep.ok and sorted(rep.done) == ["p0", "p1"]
    assert rep.plan.startswith("local cluster: 2 CPU workers x ")
    assert all(f"pid={os.getpid()} " not in where for _, where in rep.workers)


def test_two_fake_gpus_get_one_pinned_worker_each_and_the_driver_builds_nothing(
        cohort, tmp_path, monkeypatch, caplog):
    """A real local cluster planned for 2 GPUs (faked: this machine has none): one worker per
    GPU with its own CUDA_VISIBLE_DEVICES, slide tasks holding one GPU resource each, the
    encoder built only on the workers, and the same store as in-process."""
    monkeypatch.setattr(cluster, "visible_gpus", lambda n_gpus=None: ("0", "1"))
    _no_model_in_this_process(monkeypatch)
    with caplog.at_level(logging.INFO, logger="wsi_ssl.tiling._embed"):
        rep = embed_slides(cohort, "tiny-cnn", tmp_path / "gpu.zarr", device="cpu", views=2,
                           view_tiles=8, **KW)
    assert rep.ok and sorted(rep.done) == ["p0", "p1", "p2", "p3"], rep.failed
    assert "one per GPU (CUDA_VISIBLE_DEVICES=0,1)" in rep.plan
    assert "workers advertise GPU resources; each slide task holds one GPU" in caplog.text
    pinned = {}
    for _, where in rep.workers:
        m = re.search(r"pid=(\d+) CUDA_VISIBLE_DEVICES=(\S+) device=cpu", where)
        assert m, where
        assert int(m[1]) != os.getpid()
        assert pinned.setdefault(m[1], m[2]) == m[2]  # a worker keeps its one GPU
    assert sorted(pinned.values()) == ["0", "1"]  # two workers, two different GPUs
    monkeypatch.undo()
    ref = embed_slides(cohort, "tiny-cnn", tmp_path / "ref.zarr", client="sync", views=2,
                       view_tiles=8, **KW)
    got, want = _arrays(tmp_path / "gpu.zarr"), _arrays(ref.store)
    assert got.keys() == want.keys()
    for sid in want:
        for a, b in zip(got[sid], want[sid], strict=True):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- the encoder


def test_the_encoder_is_built_once_per_process_never_by_the_driver_as_well(cohort, tmp_path):
    log = tmp_path / "builds.txt"

    def build():
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        return TinyCNN(8)

    register_encoder("test-counting-cnn", build, input_size=64, embed_dim=32, overwrite=True)
    rep = embed_slides(cohort[:3], "test-counting-cnn", tmp_path / "c.zarr", client="sync", **KW)
    assert rep.ok and len(rep.done) == 3
    # in-process the driver is the worker: one build for three slides (it was two before:
    # one in the driver for the fingerprint, one for the work)
    assert log.read_text().split() == [str(os.getpid())]
    assert TileStore(rep.store).encoder_fingerprint == encoder_identity(
        "test-counting-cnn").fingerprint


def test_spec_fingerprint_follows_the_weights_bytes_and_the_store_refuses_others(
        cohort, tmp_path, monkeypatch):
    enc = create_encoder("tiny-cnn", device="cpu")
    w = tmp_path / "w.pth"
    torch.save(enc.model.state_dict(), w)
    a = encoder_identity("tiny-cnn", weights=w)
    assert a == encoder_identity("tiny-cnn", weights=w)  # stable
    assert a.fingerprint == spec_fingerprint(create_encoder("tiny-cnn", weights=w).spec)
    assert (a.embed_dim, a.input_size, a.name) == (64, 64, "tiny-cnn")
    assert a.fingerprint != encoder_identity("tiny-cnn").fingerprint  # weights file vs none
    _no_model_in_this_process(monkeypatch)  # identity needs no model
    assert encoder_identity("tiny-cnn", weights=w) == a
    monkeypatch.undo()

    store = tmp_path / "w.zarr"
    assert embed_slides(cohort[:1], "tiny-cnn", store, weights=w, client="sync", **KW).ok
    sd = enc.model.state_dict()
    first = next(k for k, v in sd.items() if v.is_floating_point())
    sd[first] = sd[first] * 1.5
    torch.save(sd, w)  # same path and size, other bytes
    os.utime(w, ns=(1_000_000_000, 1_000_000_000))
    b = encoder_identity("tiny-cnn", weights=w)
    assert b.fingerprint != a.fingerprint
    with pytest.raises(EncoderMismatchError, match=rf"fingerprint {a.fingerprint}\); refusing"):
        embed_slides(cohort[1:2], "tiny-cnn", store, weights=w, client="sync", **KW)


def test_a_worker_with_other_weights_bytes_refuses_to_embed(cohort, tmp_path):
    enc = create_encoder("tiny-cnn", device="cpu")
    w = tmp_path / "w2.pth"
    torch.save(enc.model.state_dict(), w)
    ident = encoder_identity("tiny-cnn", weights=w)
    payload = EncoderPayload(fingerprint="0123456789abcdef", spec=ident.spec, device="cpu")
    job = {"path": str(cohort[0]), "slide_id": "p0", "slide_mpp": None}
    res = run_job(job, payload, EmbedConfig(**KW))
    assert isinstance(res, SlideFailure)
    assert res.error.startswith(f"EncoderMismatchError: encoder 'tiny-cnn' on host "
                                f"{os.uname().nodename} has fingerprint {ident.fingerprint}, "
                                "expected 0123456789abcdef")


def test_weights_that_do_not_fit_stop_an_in_process_run_with_one_error(cohort, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(5, 5)}, bad)
    with pytest.raises(WeightsError, match=re.escape(str(bad))):
        embed_slides(cohort[:2], "tiny-cnn", tmp_path / "bad.zarr", weights=bad, client="sync",
                     **KW)
    assert TileStore(tmp_path / "bad.zarr", mode="r").failures == {}  # not N copies of it
    # on a worker it is each slide's failure, found once: the weights are not reloaded per slide
    ident = encoder_identity("tiny-cnn", weights=bad)
    payload = EncoderPayload(fingerprint=ident.fingerprint, spec=ident.spec, device="cpu")
    job = {"path": str(cohort[0]), "slide_id": "p0", "slide_mpp": None}
    first = run_job(job, payload, EmbedConfig(**KW))
    bad.unlink()  # a second attempt to load it would now say "cannot be read"
    second = run_job(job, payload, EmbedConfig(**KW))
    assert isinstance(first, SlideFailure) and first.error.startswith("WeightsError")
    assert second.error == first.error


def _old_settings_hash(path: Path, fingerprint: str) -> str:
    """The settings hash exactly as embed_slides computed it before EmbedConfig (tile_size=64,
    other settings at their defaults)."""
    blob = {"mpp": 0.5, "tile_size": TILE, "overlap": 0, "min_tissue": 0.25, "views": 0,
            "view_tiles": 256, "augment_cfg": get_augment_config("histo").to_dict(), "seed": 0,
            "dtype": "float16", "fingerprint": fingerprint, "backend": "auto"}
    blob.update(job_mpp=None, path=str(path.resolve()), source=file_fingerprint(path))
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_a_store_made_before_spec_fingerprints_is_still_accepted_and_skipped(cohort, tmp_path,
                                                                            caplog):
    enc = create_encoder("tiny-cnn", device="cpu")
    old = TileStore(tmp_path / "old.zarr", mode="a")
    old.bind_encoder("tiny-cnn", enc.fingerprint, 64)  # the model fingerprint of old releases
    old.write_slide("p0", np.zeros((3, 64), np.float32), np.zeros((3, 2), np.int64),
                    attrs={"settings_hash": _old_settings_hash(cohort[0], enc.fingerprint)})
    with caplog.at_level(logging.INFO, logger="wsi_ssl.tiling._embed"):
        rep = embed_slides(cohort[:2], "tiny-cnn", old.path, client="sync", **KW)
    assert rep.skipped == ("p0",) and rep.done == ("p1",)  # same settings: nothing redone
    assert "made before spec fingerprints" in caplog.text
    new = TileStore(old.path, mode="r")
    assert new.encoder_fingerprint == enc.fingerprint
    assert new["p1"].attrs["settings_hash"] == _old_settings_hash(cohort[1], enc.fingerprint)
    # a new store: the spec fingerprint, and the same settings hash formula
    rep = embed_slides(cohort[1:2], "tiny-cnn", tmp_path / "new.zarr", client="sync", **KW)
    fp = encoder_identity("tiny-cnn").fingerprint
    assert TileStore(rep.store).encoder_fingerprint == fp
    assert TileStore(rep.store)["p1"].attrs["settings_hash"] == _old_settings_hash(cohort[1], fp)


# --------------------------------------------------------------------------- overlap


def test_next_slide_is_prepared_while_this_one_encodes_and_writes_run_in_a_thread(
        cohort, tmp_path, monkeypatch):
    prepared: dict[str, threading.Event] = {}
    overlapped: list[bool] = []
    writers: list[str] = []
    real_prepare, real_encode = worker.prepare_slide, worker.encode_slide
    real_write = store_mod.TileStore.write_slide

    def prepare(job, config):
        out = real_prepare(job, config)
        prepared.setdefault(job["slide_id"], threading.Event()).set()
        return out

    def encode(prep, enc, config):
        nxt = {"p0": "p1", "p1": "p2"}.get(prep.job["slide_id"])
        if nxt:  # the next slide gets opened and gridded while this one is being encoded
            overlapped.append(prepared.setdefault(nxt, threading.Event()).wait(timeout=30))
        return real_encode(prep, enc, config)

    def write(self, *a, **k):
        writers.append(threading.current_thread().name)
        return real_write(self, *a, **k)

    monkeypatch.setattr(worker, "prepare_slide", prepare)
    monkeypatch.setattr(worker, "encode_slide", encode)
    monkeypatch.setattr(store_mod.TileStore, "write_slide", write)
    rep = embed_slides(cohort[:3], "tiny-cnn", tmp_path / "o.zarr", client="sync", **KW)
    assert rep.ok and rep.done == ("p0", "p1", "p2")
    assert overlapped == [True, True]
    assert len(writers) == 3 and all(n.startswith("wsi-ssl-write") for n in writers)


def test_a_failing_slide_between_good_ones_with_prefetch(cohort, tmp_path, slides_dir):
    slides = [cohort[0], slides_dir / "broken.svs", cohort[1]]
    rep = embed_slides(slides, "tiny-cnn", tmp_path / "f.zarr", client="sync", **KW)
    assert rep.done == ("p0", "p1") and [f[0] for f in rep.failed] == ["broken"]
    assert "SlideOpenError" in rep.failed[0][2]


def test_view_bank_augmented_by_the_consumer_equals_the_reader_path(cohort, tmp_path,
                                                                    monkeypatch):
    """The GPU path (uint8 tiles to the encoder's device, augmentations there) run on the CPU:
    the same bank as augmenting in the reader thread."""
    kw = KW | {"views": 3, "view_tiles": 40, "batch_size": 16, "client": "sync"}
    ref = embed_slides(cohort[:2], "tiny-cnn", tmp_path / "reader.zarr", **kw)
    monkeypatch.setattr(worker, "_augment_on_device", lambda enc: True)
    dev = embed_slides(cohort[:2], "tiny-cnn", tmp_path / "device.zarr", **kw)
    assert ref.n_view_tiles == dev.n_view_tiles == 2 * 3 * 40
    a, b = _arrays(ref.store), _arrays(dev.store)
    for sid in a:
        np.testing.assert_array_equal(a[sid][3], b[sid][3])  # view_index
        np.testing.assert_allclose(a[sid][2].astype(np.float32), b[sid][2].astype(np.float32),
                                   rtol=1e-2, atol=1e-2)
        np.testing.assert_array_equal(a[sid][0], b[sid][0])  # plain features


# --------------------------------------------------------------------------- settings


def test_embed_config_is_validated_frozen_and_keyword_only():
    with pytest.raises(TypeError):
        EmbedConfig(0.5)  # type: ignore[misc]
    cfg = EmbedConfig(tile_size=128.0, views=2)
    assert cfg.tile_size == 128 and isinstance(cfg.tile_size, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mpp = 1.0  # type: ignore[misc]
    for kw, msg in (({"mpp": 0}, "mpp=0 must be a number > 0"),
                    ({"tile_size": 4}, "tile_size=4 must be an integer >= 8"),
                    ({"views": -1}, "views=-1 must be an integer >= 0"),
                    ({"min_tissue": 1.5}, "min_tissue=1.5 must be a fraction in"),
                    ({"overlap": 64, "tile_size": 64}, "overlap=64 must be smaller"),
                    ({"dtype": "int8"}, "dtype='int8' must be 'float16' or 'float32'"),
                    ({"augment": "heavy"}, "augment='heavy' is not a known augmentation"),
                    ({"batch_size": True}, "batch_size=True must be an integer >= 1")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            EmbedConfig(**kw)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["augment_preset"] == "histo" and d["augment_cfg"]["rot90"] is True
    assert "batch_size" not in cfg.stored_settings() and "device" not in cfg.stored_settings()
    assert EmbedConfig(augment=cfg.augment_config.to_dict()).augment == cfg.augment_config


def test_config_and_keywords_give_the_same_store(cohort, tmp_path):
    a = embed_slides(cohort[:1], "tiny-cnn", tmp_path / "kw.zarr", client="sync", **KW)
    b = embed_slides(cohort[:1], "tiny-cnn", tmp_path / "cfg.zarr", client="sync",
                     config=EmbedConfig(**KW))
    ha = TileStore(a.store)["p0"].attrs
    hb = TileStore(b.store)["p0"].attrs
    assert ha["settings_hash"] == hb["settings_hash"] and ha["embed_settings"] == hb["embed_settings"]
    assert ha["embed_settings"]["settings_from_preset"] is None
    # keywords are EmbedConfig fields applied over config= (dataclasses.replace)
    merged = embed_config("tiny-cnn", EmbedConfig(**KW), {"seed": 3})
    assert merged == dataclasses.replace(EmbedConfig(**KW), seed=3)
    with pytest.raises(ConfigError, match="unknown setting view_tile=8; did you mean view_tiles"):
        embed_slides(cohort[:1], "tiny-cnn", tmp_path / "x.zarr", view_tile=8)


def test_mpp_and_tile_size_default_to_the_preset_else_half_micron_224():
    p = get_preset("uni_v1")  # a TRIDENT alias of "uni"
    assert (p.name, p.mpp, p.tile_size) == ("uni", 0.5, 256)
    assert grid_settings("uni_v1") == (0.5, 256, "uni")
    assert grid_settings("uni", mpp=1.0) == (1.0, 256, "uni")
    assert grid_settings("uni", mpp=1.0, tile_size=512) == (1.0, 512, None)
    assert grid_settings("tiny-cnn") == (0.5, 224, None)


# --------------------------------------------------------------------------- GPU (CUDA only)



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_embedding_with_views_agrees_with_the_cpu(cohort, tmp_path):
    kw = KW | {"views": 2, "view_tiles": 16, "client": "sync"}
    cpu = embed_slides(cohort[:1], "tiny-cnn", tmp_path / "cpu.zarr", device="cpu", **kw)
    gpu = embed_slides(cohort[:1], "tiny-cnn", tmp_path / "gpu.zarr", device="cuda", **kw)
    assert "device=cuda" in gpu.workers[0][1]
    a, b = _arrays(cpu.store)["p0"], _arrays(gpu.store)["p0"]
    np.testing.assert_array_equal(a[3], b[3])
    for x, y in ((a[0], b[0]), (a[2].reshape(-1, 64), b[2].reshape(-1, 64))):
        cos = torch.nn.functional.cosine_similarity(torch.from_numpy(x.astype(np.float32)),
                                                    torch.from_numpy(y.astype(np.float32)))
        assert cos.min() > 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tiles_travel_in_pinned_memory(cohort, monkeypatch):
    enc = create_encoder("tiny-cnn", device="cuda")
    seen: list[bool] = []
    real = enc.embed

    def embed(x):
        if x.dtype == torch.uint8:
            seen.append(x.is_pinned())
        return real(x)

    monkeypatch.setattr(enc, "embed", embed)
    prep = worker.prepare_slide({"path": str(cohort[0]), "slide_id": "p0", "slide_mpp": None},
                                EmbedConfig(**KW))
    res = worker.encode_slide(prep, enc, EmbedConfig(**KW))
    assert isinstance(res, SlideResult) and seen and all(seen)
