"""The estimator contract (scikit-learn's ``check_estimator`` in spirit), run over every estimator
of the package: clone, get/set params, parameters stored as given, ``NotFittedError`` before
``fit``, ``fit`` returns self and only adds ``_``-suffixed attributes, determinism under a seed,
pickling and save/load round trips."""

from __future__ import annotations

import inspect
import pickle
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError

from wsi_ssl.errors import NotFittedError
from wsi_ssl.mil import MILClassifier
from wsi_ssl.pretrain import SlideSSL

pytestmark = pytest.mark.usefixtures("single_thread_torch")

D = 8


@dataclass(frozen=True)
class Spec:
    """How to drive one estimator: build it, fit it on ``data``, get a numeric output."""

    make: Callable[..., Any]
    fit: Callable[[Any, Any], Any]
    output: Callable[[Any, Any], np.ndarray]
    changed: dict[str, Any]  # a set_params round trip: parameter -> a new valid value


def _tile_store(path: Path):
    """A real zarr TileStore of 8 slides with a view bank (random features, grid coords)."""
    from wsi_ssl.store import TileStore

    rng = np.random.default_rng(0)
    store = TileStore(path, mode="a")
    store.bind_encoder("contract-enc", "fp-contract", D)
    for i in range(8):
        f = rng.normal(size=(12, D)) + (i % 2)
        xy = np.stack([np.arange(12) % 4, np.arange(12) // 4], 1) * 256
        vi = rng.integers(0, 12, size=(2, 6))
        store.write_slide(f"s{i}", f, xy, views=f[vi] + 0.1 * rng.normal(size=(2, 6, D)),
                          view_index=vi, attrs={"stride_level0": 256}, dtype="float32")
    return store


def _bags():
    rng = np.random.default_rng(1)
    y = np.arange(24) % 2
    bags = [rng.normal(size=(int(rng.integers(3, 9)), D)) + 1.5 * c for c in y]
    return bags, y


SPECS = {
    "SlideSSL": Spec(
        make=lambda **kw: SlideSSL("abmil", **{
            **dict(embed_dim=8, proj_dims=(8, 4), tiles_per_view=4, batch_size=4, epochs=2,
                   lr=1e-3, warmup_epochs=1, temperature=0.2, device="cpu"), **kw}),
        fit=lambda est, data: est.fit(data["store"]),
        output=lambda est, data: est.transform(data["store"], dtype="float32").embeddings,
        changed={"epochs": 3, "head_kwargs": {"dropout": 0.1}, "tiles_per_view": "auto"},
    ),
    "MILClassifier": Spec(
        make=lambda **kw: MILClassifier("abmil", **{
            **dict(embed_dim=8, epochs=3, lr=1e-2, batch_size=6, dropout=0.1, device="cpu"),
            **kw}),
        fit=lambda est, data: est.fit(*data["bags"]),
        output=lambda est, data: est.predict_proba(data["bags"][0]),
        changed={"epochs": 5, "head": "gated_abmil"},
    ),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return {"store": _tile_store(tmp_path_factory.mktemp("est") / "store.zarr"),
            "bags": _bags()}


@pytest.fixture(params=sorted(SPECS))
def spec(request) -> Spec:
    return SPECS[request.param]


def _param_names(est: BaseEstimator) -> list[str]:
    sig = inspect.signature(type(est).__init__)
    return [n for n in sig.parameters if n != "self"]


def test_every_estimator_is_covered():
    """A new estimator must be added to SPECS (and so to every check below)."""
    import wsi_ssl.mil
    import wsi_ssl.pretrain

    found = {name for mod in (wsi_ssl.mil, wsi_ssl.pretrain) for name in mod.__all__
             if isinstance(getattr(mod, name), type)
             and issubclass(getattr(mod, name), BaseEstimator)}
    assert found == set(SPECS)


def test_constructor_stores_parameters_as_given(spec):
    est = spec.make()
    assert isinstance(est, BaseEstimator)
    params = est.get_params(deep=True)
    assert set(params) == set(_param_names(est))
    sig = inspect.signature(type(est).__init__).parameters
    positional = [n for n, p in sig.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    assert positional == ["head"]  # the one positional argument; the rest keyword-only
    marker = {"seed": 12345}
    est2 = spec.make(**marker, head_kwargs=None)
    assert est2.seed == 12345 and est2.get_params()["seed"] == 12345


def test_get_set_params_round_trip_and_clone(spec):
    est = spec.make()
    out = est.set_params(**spec.changed)
    assert out is est
    for name, value in spec.changed.items():
        assert est.get_params()[name] == value
    twin = clone(est)
    assert twin is not est and twin.get_params() == est.get_params()
    with pytest.raises(ValueError, match="no_such_param"):
        est.set_params(no_such_param=1)


def test_not_fitted_error_before_fit(spec, data):
    with pytest.raises(NotFittedError, match="not fitted"):
        spec.output(spec.make(), data)
    # also scikit-learn's own NotFittedError, as code written for sklearn estimators catches
    with pytest.raises(SklearnNotFittedError, match="not fitted"):
        spec.output(spec.make(), data)


def test_errors_import_without_scikit_learn_and_pickle():
    """``wsi_ssl.errors`` makes its sklearn-derived NotFittedError on first use, not at import."""
    code = ("import sys, wsi_ssl.errors; assert 'sklearn' not in sys.modules; "
            "from wsi_ssl.errors import NotFittedError, WsiSslError; "
            "assert 'sklearn' in sys.modules and issubclass(NotFittedError, WsiSslError)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    err = pickle.loads(pickle.dumps(NotFittedError("x")))
    assert type(err) is NotFittedError and str(err) == "x"


def test_fit_returns_self_adds_only_learned_attributes(spec, data):
    est = spec.make()
    before_params = est.get_params()
    before = set(vars(est))
    assert spec.fit(est, data) is est
    added = set(vars(est)) - before
    assert added and all(a.endswith("_") for a in added), sorted(added)
    assert est.get_params() == before_params  # fit does not touch the parameters
    twin = clone(est)  # a clone of a fitted estimator is unfitted
    assert not any(a.endswith("_") for a in vars(twin))
    with pytest.raises(NotFittedError):
        spec.output(twin, data)


def test_deterministic_under_a_seed(spec, data):
    a = spec.output(spec.fit(spec.make(seed=3), data), data)
    b = spec.output(spec.fit(spec.make(seed=3), data), data)
    c = spec.output(spec.fit(spec.make(seed=4), data), data)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_pickle_and_save_load_round_trip(spec, data, tmp_path):
    est = spec.fit(spec.make(), data)
    ref = spec.output(est, data)
    again = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(spec.output(again, data), ref)
    loaded = type(est).load(est.save(tmp_path / "model"))  # safetensors + JSON, no pickle
    assert loaded.get_params() == est.get_params()
    np.testing.assert_array_equal(spec.output(loaded, data), ref)


def test_slide_ssl_fit_transform_embeds_the_slides_it_fitted(data):
    store = data["store"]
    ids = ["s1", "s4", "s6", "s7"]
    emb = SPECS["SlideSSL"].make().fit_transform(store, slide_ids=ids, dtype="float32")
    assert list(emb.slide_ids) == ids
    ref = SPECS["SlideSSL"].make().fit(store, slide_ids=ids).transform(store, slide_ids=ids,
                                                                       dtype="float32")
    np.testing.assert_array_equal(emb.embeddings, ref.embeddings)
