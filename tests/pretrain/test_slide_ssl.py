"""SlideSSL (Giga-SSL slide-level contrastive pretraining) on real zarr tile stores written with
seeded synthetic features whose slide label lives in a minority of tiles."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests._helpers import wait_for_line
from wsi_ssl.errors import (
    CheckpointError,
    ConfigError,
    EncoderMismatchError,
    InputError,
    NotFittedError,
    StoreFormatError,
    WeightsError,
)
from wsi_ssl.pretrain import SlideSSL, mean_pool_embeddings, plot_loss
from wsi_ssl.pretrain._optim import build_optimizer, warmup_cosine, warmup_cosine_factor
from wsi_ssl.pretrain._slide_data import CoordAugment, augment_coords, grid_stride
from wsi_ssl.pretrain._slide_train import SlideCheckpoint
from wsi_ssl.store import SlideEmbeddings, TileStore

DIM = 32
STRIDE = 224


def write_store(path: Path, *, n: int = 32, tiles: int = 60, views: int = 4, view_tiles: int = 24,
                seed: int = 0, frac: float = 0.15, encoder: str = "synthetic-enc",
                extra: dict | None = None) -> tuple[TileStore, np.ndarray]:
    """A real TileStore of ``n`` slides: tiles of 6 "tissue types" plus noise; label-1 slides
    have ``frac`` of their tiles shifted along a hidden direction. Views = rows of the clean
    features with one shared offset per view (the shared augmentation) and per-tile noise."""
    rng = np.random.default_rng(seed)
    proto = rng.normal(size=(6, DIM))
    signal_dir = rng.normal(size=DIM)
    signal_dir /= np.linalg.norm(signal_dir)
    labels = np.arange(n) % 2
    store = TileStore(path, mode="a")
    store.bind_encoder(encoder, f"fp-{encoder}", DIM)
    for i in range(n):
        t = int(tiles)
        f = proto[rng.integers(0, 6, t)] + 0.6 * rng.normal(size=(t, DIM))
        if labels[i]:
            f[rng.random(t) < frac] += 3.0 * signal_dir
        side = int(np.ceil(np.sqrt(max(t, 1))))
        xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:t]
        vi = np.stack([rng.choice(t, view_tiles, replace=view_tiles > t) for _ in range(views)]) \
            if views else None
        vw = (f[vi] + 0.3 * rng.normal(size=(views, 1, DIM))
              + 0.2 * rng.normal(size=(views, view_tiles, DIM))) if views else None
        store.write_slide(f"slide{i:03d}", f, xy * STRIDE, views=vw, view_index=vi,
                          attrs={"stride_level0": STRIDE}, dtype="float32")
    for sid, (f, xy, vw, vi) in (extra or {}).items():
        store.write_slide(sid, f, xy, views=vw, view_index=vi, dtype="float32")
    return store, labels


def small(head: str = "sparseconv", **kw) -> SlideSSL:
    """Small-cohort settings (the paper defaults are for 11k TCGA slides on a GPU)."""
    base = dict(embed_dim=64, proj_dims=(64, 32), batch_size=16, epochs=25, lr=2e-3,
                warmup_epochs=2, temperature=0.1, device="cpu", seed=0)
    base.update(kw)
    return SlideSSL(head, **base)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("ssl") / "store.zarr")


@pytest.fixture(scope="module")
def fitted(cohort, tmp_path_factory):
    store, _ = cohort
    ckpt = tmp_path_factory.mktemp("ckpt")
    return small(epochs=40, checkpoint_dir=ckpt).fit(store), ckpt


# -- pieces -----------------------------------------------------------------------------------------
def test_coord_augment_is_a_similarity_and_non_negative():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, size=(5, 2))
    out = augment_coords(xy, np.random.default_rng(1), CoordAugment(scale=(1.0, 1.0)))
    assert out.shape == (5, 2) and out.dtype == np.float32 and (out >= 0).all()
    d_in = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    d_out = np.linalg.norm(out[:, None] - out[None], axis=-1)
    np.testing.assert_allclose(d_out, d_in, rtol=1e-4, atol=1e-3)  # rotation/flip/shift only
    again = augment_coords(xy, np.random.default_rng(1), CoordAugment(scale=(1.0, 1.0)))
    np.testing.assert_array_equal(out, again)
    scaled = augment_coords(xy, np.random.default_rng(2), CoordAugment(rotate=False, flip=False,
                                                                       scale=(2.0, 2.0),
                                                                       translate=0))
    np.testing.assert_allclose(scaled, 2 * (xy - xy.min(0)), rtol=1e-5)
    with pytest.raises(ConfigError, match="scale"):
        CoordAugment(scale=(1.3, 0.7))
    with pytest.raises(ConfigError, match=r"^CoordAugment\(scale=0.7\) must be a pair"):
        CoordAugment(scale=0.7)
    with pytest.raises(ConfigError, match="translate=-1"):
        CoordAugment(translate=-1)
    with pytest.raises(ConfigError, match="rotate='yes'"):
        CoordAugment(rotate="yes")
    with pytest.raises(TypeError):
        CoordAugment(True)  # keyword-only


def test_grid_stride_from_attrs_or_coords():
    xy = np.array([[0, 0], [448, 0], [224, 672]])
    assert grid_stride(xy, {"stride_level0": 100}) == 100
    assert grid_stride(xy, {}) == 224


def test_lr_schedule_warmup_then_cosine():
    import torch

    f = [warmup_cosine_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False))
    assert f[-1] < 0.01
    # torch's LambdaLR drives the optimiser with exactly base_lr * factor, and resumes mid-way
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = warmup_cosine(opt, base_lr=0.5, total_steps=100, warmup_steps=10)
    seen = []
    for _ in range(100):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.5 * v for v in f]
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    warmup_cosine(opt2, base_lr=0.5, total_steps=100, warmup_steps=10, start_step=37)
    assert opt2.param_groups[0]["lr"] == 0.5 * f[37]


def test_weight_decay_reaches_the_optimiser(cohort, tmp_path):
    model = small(weight_decay=0.25)._build_net(DIM)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.25)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.25 and opt.param_groups[1]["weight_decay"] == 0
    assert all(p.ndim >= 2 for p in opt.param_groups[0]["params"]) and decayed
    # and it acts: same seed, same data, only the decay differs -> smaller weights
    store, _ = cohort
    norms = {}
    for wd in (0.0, 5.0):
        m = small(head="abmil", epochs=6, weight_decay=wd, lr=1e-2).fit(store)
        norms[wd] = sum(float(p.detach().norm()) for p in m.net_.parameters() if p.ndim >= 2)
    assert norms[5.0] < 0.9 * norms[0.0]


# -- learning ---------------------------------------------------------------------------------------
def test_fit_learns_the_minority_signal(cohort, fitted):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    store, labels = cohort
    model, _ = fitted
    emb = model.transform(store)
    assert isinstance(emb, SlideEmbeddings) and emb.embeddings.shape == (32, 64)
    assert emb.embeddings.dtype == np.float16 and emb.nbytes_per_slide == 128
    np.testing.assert_allclose(np.linalg.norm(emb.embeddings.astype(np.float32), axis=1), 1,
                               atol=2e-3)
    x = emb.embeddings.astype(np.float32)
    score = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x, labels, cv=4,
                              method="predict_proba")[:, 1]
    auc = roc_auc_score(labels, score)
    assert auc > 0.8, auc
    assert model.history_[-1] < model.history_[0] - 0.3
    assert emb.provenance["store_fingerprint"] == store.fingerprint
    assert emb.provenance["model"]["head"] == "sparseconv"


@pytest.mark.parametrize("head", ["abmil", "resmlp-mean"])
def test_other_heads_train(cohort, head):
    store, _ = cohort
    m = small(head=head, epochs=4).fit(store)
    e = m.transform(store, slide_ids=store.slide_ids[:3], dtype="float32")
    assert e.embeddings.shape == (3, 64) and np.isfinite(e.embeddings).all()
    assert m.history_[-1] < m.history_[0]


def test_deterministic_given_seed(cohort, fitted):
    store, _ = cohort
    model, _ = fitted
    one, two = small(epochs=3).fit(store), small(epochs=3).fit(store)
    a, b = one.transform(store), two.transform(store)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)
    assert one.history_ == two.history_
    other = small(seed=1, epochs=3).fit(store).transform(store)
    assert not np.allclose(other.embeddings.astype(np.float32), a.embeddings.astype(np.float32))
    full = model.transform(store)
    sub = model.transform(store, slide_ids=store.slide_ids[5:8])
    np.testing.assert_array_equal(sub.embeddings, full.embeddings[5:8])  # per-slide seeding
    model.inference_chunks = 50  # random chunks with replacement: deterministic too
    r1, r2 = model.transform(store), model.transform(store)
    model.inference_chunks = None
    np.testing.assert_array_equal(r1.embeddings, r2.embeddings)
    assert not np.array_equal(r1.embeddings, full.embeddings)


def test_save_load_roundtrip_and_artefacts(cohort, fitted, tmp_path):
    store, _ = cohort
    model, ckpt = fitted
    assert (ckpt / "loss_curve.png").stat().st_size > 1000
    assert (ckpt / "checkpoint.safetensors").is_file()
    out = model.save(tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["params"]["tiles_per_view"] == 5 and cfg["encoder_fingerprint"] == "fp-synthetic-enc"
    loaded = SlideSSL.load(out)
    np.testing.assert_array_equal(loaded.transform(store).embeddings,
                                  model.transform(store).embeddings)
    assert loaded.history_ == model.history_
    with pytest.raises(WeightsError, match="not a SlideSSL model directory"):
        SlideSSL.load(tmp_path)


def test_models_saved_before_the_shared_persistence_still_load(cohort, tmp_path):
    """config.json as written before SlideSSL moved onto wsi_ssl._persist (no
    format_version) loads and embeds the same; the unpublished pre-attention-pooling
    migration is gone: such a directory is refused, not silently rebuilt."""
    store, _ = cohort
    model = small(epochs=2).fit(store)
    out = model.save(tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["format"] == "wsi-ssl-slide-ssl" and cfg["format_version"] == 1
    del cfg["format_version"]
    (out / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(SlideSSL.load(out).transform(store).embeddings,
                                  model.transform(store).embeddings)
    old = small(epochs=1, head_kwargs={"pooling": "mean"}).fit(store).save(tmp_path / "old")
    cfg = json.loads((old / "config.json").read_text())
    cfg["params"]["head_kwargs"] = {}  # what versions before attention pooling wrote
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="do not fit the configured model"):
        SlideSSL.load(old)


_KILL_SCRIPT = """
import sys, time
from wsi_ssl.pretrain import _slide_train
from wsi_ssl.pretrain import SlideSSL
from wsi_ssl.store import TileStore
orig = _slide_train.SlideCheckpoint.on_epoch_end
calls = []
def save_then_stop(*a, **k):
    out = orig(*a, **k)
    calls.append(1)
    if len(calls) == 2:  # the checkpoint of epoch 2 is on disk: tell the parent, which kills us
        print("SAVED-2", flush=True)
        time.sleep(600)  # not synchronisation: stands in for the rest of the training
    return out
_slide_train.SlideCheckpoint.on_epoch_end = save_then_stop
kw = dict(embed_dim=32, proj_dims=(32, 16), batch_size=8, epochs=8, lr=2e-3, warmup_epochs=1,
          temperature=0.1, device="cpu", seed=3, checkpoint_dir=sys.argv[2])
SlideSSL("abmil", **kw).fit(TileStore(sys.argv[1], mode="r"))
"""


def _ckpt_epoch(path: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return int(json.loads(fh.metadata()["info"])["epoch"])
    except Exception:  # not there yet
        return 0


def test_resume_after_sigkill(cohort, tmp_path):
    store, _ = cohort
    kw = dict(embed_dim=32, proj_dims=(32, 16), batch_size=8, epochs=8, lr=2e-3,
              warmup_epochs=1, temperature=0.1, device="cpu", seed=3)
    ckpt = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(store.path), str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "SAVED-2", timeout=120)  # exited early or hung: fails, with stderr
    finally:
        proc.kill()  # SIGKILL
        _, err = proc.communicate(timeout=60)
    killed_at = _ckpt_epoch(ckpt / "checkpoint.safetensors")
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert 2 <= _ckpt_epoch(ckpt / "checkpoint.safetensors") < 8
    resumed = SlideSSL("abmil", checkpoint_dir=ckpt, **kw).fit(store, resume=True)
    assert 2 <= resumed.start_epoch_ < 8
    straight = SlideSSL("abmil", **kw).fit(store)
    assert resumed.start_epoch_ >= killed_at and len(resumed.history_) == 8
    np.testing.assert_allclose(resumed.history_, straight.history_, rtol=1e-4)
    # outputs, not raw parameters: a parameter with a zero gradient (the attention logit bias under
    # softmax) is driven by float noise, which BLAS threading may order differently per process
    a = resumed.transform(store, dtype="float32").embeddings
    b = straight.transform(store, dtype="float32").embeddings
    np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        SlideSSL("abmil", checkpoint_dir=ckpt, **{**kw, "lr": 1e-2}).fit(store, resume=True)


# -- bad input --------------------------------------------------------------------------------------
def test_store_without_view_bank_is_refused(tmp_path):
    store, _ = write_store(tmp_path / "noviews.zarr", n=4, views=0)
    with pytest.raises(StoreFormatError, match=r"no augmentation view bank.*--views"):
        small().fit(store)


def test_empty_and_small_slides(tmp_path):
    empty = (np.zeros((0, DIM), np.float32), np.zeros((0, 2), np.int64), None, None)
    rng = np.random.default_rng(0)
    f3 = rng.normal(size=(3, DIM)).astype(np.float32)
    tiny = (f3, np.array([[0, 0], [224, 0], [0, 224]]), f3[None, [0, 1, 2]], np.array([[0, 1, 2]]))
    store, _ = write_store(tmp_path / "s.zarr", n=6, extra={"empty_slide": empty,
                                                            "tiny_slide": tiny})
    with pytest.warns(UserWarning) as rec:
        m = small(head="abmil", epochs=2).fit(store)
    msgs = " ".join(str(w.message) for w in rec)
    assert "without tiles" in msgs and "empty_slide" in msgs
    assert "fewer than 5 tiles" in msgs and "tiny_slide (3)" in msgs
    assert m.skipped_slides_ == ("empty_slide",) and "tiny_slide" in m.slide_ids_
    with pytest.warns(UserWarning, match="empty_slide"):
        e = m.transform(store)
    assert "empty_slide" not in e.slide_ids and "tiny_slide" in e.slide_ids
    assert e.provenance["skipped"] == ["empty_slide"]


def test_non_finite_slides_are_excluded_by_name(tmp_path):
    """A slide whose stored statistics say NaN is left out of training with a warning naming it
    (setup reads statistics only); encoding it is refused by name."""
    f = np.ones((10, DIM), np.float32)
    f[3, 4] = np.nan
    bad = (f, np.zeros((10, 2), np.int64), f[None, :5], np.arange(5)[None])
    store, _ = write_store(tmp_path / "nan.zarr", n=3, extra={"bad_slide": bad})
    with pytest.warns(UserWarning, match=r"excluding 1 slide.*NaN/inf.*'bad_slide'"):
        m = small(tiles_per_view=5).fit(store)
    assert m.excluded_slides_ == ("bad_slide",) and "bad_slide" not in m.slide_ids_
    assert np.isfinite(m.history_).all()
    with pytest.raises(InputError, match="'bad_slide' has NaN"):
        m.transform(store, slide_ids=["bad_slide"])


def test_store_from_another_encoder_is_refused(fitted, tmp_path):
    model, _ = fitted
    other, _ = write_store(tmp_path / "other.zarr", n=3, encoder="another-enc")
    with pytest.raises(EncoderMismatchError, match="fp-another-enc.*fp-synthetic-enc"):
        model.transform(other)


def test_not_fitted_bad_config_and_unknown_ids(cohort, tmp_path):
    store, _ = cohort
    with pytest.raises(NotFittedError, match="fit"):
        SlideSSL().transform(store)
    with pytest.raises(NotFittedError):
        SlideSSL().save(tmp_path)
    with pytest.raises(ConfigError, match="temperature"):
        small(temperature=0).fit(store)
    with pytest.raises(ConfigError, match="batch_size"):
        small(batch_size=1).fit(store)
    with pytest.raises(ConfigError, match="unknown MIL head"):
        small(head="sparsecnov").fit(store)
    with pytest.raises(ConfigError, match=r"resume=True\) needs checkpoint_dir"):
        small().fit(store, resume=True)
    with pytest.raises(InputError, match="not complete slides"):
        small().fit(store, slide_ids=["nope"])
    one, _ = write_store(tmp_path / "one.zarr", n=1)
    with pytest.raises(InputError, match="at least 2 slides"):
        small().fit(one)


def test_mean_pool_embeddings_is_the_mean_of_the_clean_tiles(cohort):
    store, _ = cohort
    ids = store.slide_ids[3:6]
    emb = mean_pool_embeddings(store, ids)
    assert emb.slide_ids == tuple(ids) and emb.embeddings.dtype == np.float32
    # from the stored statistics (float32 blocks summed in float64): the mean to float precision
    np.testing.assert_allclose(emb.embeddings[1], store[ids[1]].features.astype(np.float64)
                               .mean(0), rtol=1e-6, atol=1e-6)
    assert len(mean_pool_embeddings(store)) == len(store.slide_ids)


def test_plot_loss_and_older_checkpoints_resume(cohort, tmp_path, monkeypatch):
    """plot_loss draws a fitted model's curve; a slide checkpoint in the earlier layout (optimiser
    metadata next to ``info``, no scheduler state) still resumes to the same result."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    store, _ = cohort
    kw = dict(head="abmil", epochs=4, checkpoint_dir=tmp_path / "run", checkpoint_every=2)
    straight = small(**{**kw, "checkpoint_dir": None}).fit(store)
    assert plot_loss(straight, tmp_path / "loss.png").stat().st_size > 1000

    save = SlideCheckpoint.on_epoch_end

    def crash_after_epoch_2(self, progress, trainer):
        save(self, progress, trainer)
        if progress.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(SlideCheckpoint, "on_epoch_end", crash_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        small(**kw).fit(store)
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    with safe_open(str(ckpt), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    info = _json.loads(meta["info"])
    opt_meta = info.pop("optim")
    for g in opt_meta["param_groups"]:
        g.pop("initial_lr")  # no scheduler wrote it then
    save_file(tensors, str(ckpt), metadata={"format": meta["format"], "info": _json.dumps(info),
                                            "optim": _json.dumps(opt_meta)})
    resumed = small(**kw).fit(store, resume=True)
    assert resumed.start_epoch_ == 2
    np.testing.assert_allclose(resumed.history_, straight.history_, rtol=1e-5)
